-- pool, model, mb, ticket, token, lease_ms, enqueue -> {status, ticket, free, position}
local pool, model, mb, ticket, token = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]
local lease_ms, enqueue = tonumber(ARGV[11]), ARGV[12] == '1'
local m = pool .. '/' .. model
if ticket ~= '' and not redis.call('ZSCORE', K.tickets, ticket) then ticket = '' end
local holder = redis.call('HGET', K.token, m)
local cur = 0
if holder == token then cur = tonumber(redis.call('HGET', K.held, m)) or 0 end
local head = redis.call('ZRANGE', K.tickets, 0, 0)[1]
local first = (not head) or head == ticket
local shrink = holder == token and mb <= cur
if shrink or (first and (not holder or holder == token) and used() + mb - cur <= budget) then
  redis.call('HSET', K.held, m, mb)
  redis.call('HSET', K.token, m, token)
  redis.call('ZADD', K.lease, now + lease_ms, m)
  if cur == 0 then redis.call('HINCRBY', K.stats, 'grants', 1) end
  if ticket ~= '' then drop_ticket(ticket) end
  plan()
  touch()
  return {'granted', ticket, budget - used(), 0}
end
if not enqueue then
  touch()
  return {'busy', '', budget - used(), redis.call('ZCARD', K.tickets)}
end
if ticket == '' then
  ticket = tostring(redis.call('INCR', K.seq))
  -- a held reservation growing for its running job goes ahead of every load: its pool is busy, so
  -- never asked to unload, and a load behind which it waited could wait for nothing but its memory
  local growing = holder == token and cur > 0
  redis.call('ZADD', K.tickets, tonumber(ticket) - (growing and 1e15 or 0), ticket)
  redis.call('HSET', K.tinfo, ticket, cjson.encode({pool = pool, model = model, mb = mb, at = now}))
  redis.call('HINCRBY', K.stats, 'waits', 1)
end
redis.call('ZADD', K.tlease, now + lease_ms, ticket)
plan()
touch()
return {'wait', ticket, budget - used(), redis.call('ZRANK', K.tickets, ticket)}

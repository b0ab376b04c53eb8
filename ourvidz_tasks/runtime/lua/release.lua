-- member, token -> MB released
local m, token = ARGV[6], ARGV[7]
if redis.call('HGET', K.token, m) ~= token then touch() return 0 end
local mb = tonumber(redis.call('HGET', K.held, m)) or 0
redis.call('HDEL', K.held, m)
redis.call('HDEL', K.token, m)
redis.call('ZREM', K.lease, m)
redis.call('HINCRBY', K.stats, 'releases', 1)
local r = redis.call('HGET', K.requests, 'unload|' .. m)
if r then
  local reason = cjson.decode(r).reason
  if reason == 'evict' or reason == 'predict' then
    redis.call('HINCRBY', K.stats, 'switches', 1)
    redis.call('ZADD', K.switches, now, now .. ':' .. m .. ':' .. redis.call('INCR', K.seq))
  else
    redis.call('HINCRBY', K.stats, 'forced', 1)
  end
  redis.call('HDEL', K.requests, 'unload|' .. m)
end
plan()
touch()
return mb

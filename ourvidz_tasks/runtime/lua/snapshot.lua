-- -> JSON snapshot of the whole ledger
plan()
touch()
local function map(key)
  local out, raw = {}, redis.call('HGETALL', key)
  for i = 1, #raw, 2 do out[raw[i]] = raw[i + 1] end
  return out
end
local tickets = {}
for _, tk in ipairs(redis.call('ZRANGE', K.tickets, 0, -1)) do
  table.insert(tickets, cjson.decode(redis.call('HGET', K.tinfo, tk)))
end
return cjson.encode({now = now, held = map(K.held), pools = map(K.pools), tickets = tickets,
  wants = map(K.wantmb), requests = map(K.requests), stats = map(K.stats),
  switches = redis.call('ZCARD', K.switches)})

-- action, pool, model, mb, reason, ttl_ms -> 1 recorded, 0 pointless
local action, pool, model = ARGV[6], ARGV[7], ARGV[8]
local held = redis.call('HEXISTS', K.held, pool .. '/' .. model) == 1
if (action == 'unload') ~= held then touch() return 0 end
redis.call('HSET', K.requests, action .. '|' .. pool .. '/' .. model, cjson.encode({
  action = action, pool = pool, model = model, mb = tonumber(ARGV[9]), reason = ARGV[10],
  at = now, expires = now + tonumber(ARGV[11])}))
touch()
return 1

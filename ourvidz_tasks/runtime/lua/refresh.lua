-- member, token, lease_ms, mb -> 1 refreshed, 2 reinstated, 0 held by another
local m, token, lease_ms, mb = ARGV[6], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local holder = redis.call('HGET', K.token, m)
local code = 1
if holder and holder ~= token then touch() return 0 end
if not holder then
  redis.call('HSET', K.held, m, mb)
  redis.call('HSET', K.token, m, token)
  redis.call('HINCRBY', K.stats, 'reinstated', 1)
  code = 2
end
redis.call('ZADD', K.lease, now + lease_ms, m)
touch()
return code

-- pool, model, mb, ttl_ms -> 1
local m = ARGV[6] .. '/' .. ARGV[7]
redis.call('ZADD', K.wants, now + tonumber(ARGV[9]), m)
redis.call('HSET', K.wantmb, m, tonumber(ARGV[8]))
plan()
touch()
return 1

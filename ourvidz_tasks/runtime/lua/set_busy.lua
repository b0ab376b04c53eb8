-- pool, state ('busy' | 'idle') -> 1
local pool = ARGV[6]
if ARGV[7] == 'busy' then
  redis.call('HSET', K.pools, pool, 'busy')
elseif redis.call('HGET', K.pools, pool) == 'busy' or not redis.call('HGET', K.pools, pool) then
  redis.call('HSET', K.pools, pool, now)
end
plan()
touch()
return 1

-- field -> 1
redis.call('HDEL', K.requests, ARGV[6])
touch()
return 1

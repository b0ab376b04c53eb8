-- ticket, timed_out -> 1
drop_ticket(ARGV[6])
if ARGV[7] == '1' then redis.call('HINCRBY', K.stats, 'timeouts', 1) end
reclaim()
plan()
touch()
return 1

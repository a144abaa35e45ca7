-- Extends the lease if it is ours. KEYS: lease. ARGV: our id, TTL in ms.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0

-- Takes the lease if it is free (or already ours). KEYS: lease. ARGV: our
-- id, TTL in ms. Returns 1 when we hold it.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0

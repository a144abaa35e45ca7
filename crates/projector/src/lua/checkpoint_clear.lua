-- Clears the checkpoint if ARGV[1] holds the lease. KEYS: lease,
-- checkpoint. Returns 1 when it cleared it.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
return 1

-- Saves the checkpoint and the progress figures if ARGV[1] holds the lease.
-- KEYS: lease, checkpoint, progress. ARGV: owner, token (BSON), events
-- applied, heartbeat ms, last event ms or '', lag ms or '', then the
-- progress hash's field names for those four, then the field and value of
-- where the checkpoint stands (ms). Returns 1 when it saved.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[7], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[8], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], ARGV[9], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], ARGV[10], ARGV[6]) end
redis.call('HSET', KEYS[3], ARGV[11], ARGV[12])
return 1

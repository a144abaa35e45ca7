-- Moves a durability marker from the previous checkpoint's sequence to
-- the next, after guard.lua. KEYS: fence, marker. ARGV[3] the sequence of
-- the checkpoint before this one, ARGV[4] the new sequence. A marker
-- below ARGV[3] means this master lost writes that the previous checkpoint
-- counted on: it is left as it is (so that the next check sees it too) and
-- 0 is returned. A marker that does not exist yet (a new master) is set.
local m = redis.call('GET', KEYS[2])
if m and tonumber(m) < tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[4])
return 1

-- Sets a warming tenant warm, after guard.lua, unless its state changed
-- meanwhile (invalidated, or a newer warm queued). KEYS: fence, state.
-- ARGV[3] the warming state's prefix (schema, kind, epoch), ARGV[4] the
-- warm state. Returns 1 when it did.
local s = redis.call('GET', KEYS[2])
if s and string.sub(s, 1, string.len(ARGV[3])) == ARGV[3] then
  redis.call('SET', KEYS[2], ARGV[4])
  return 1
end
return 0

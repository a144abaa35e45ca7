-- Single-flight warm request on the tenant's slot: only the first caller
-- for a cold tenant moves it to warming. KEYS: state. ARGV[1] the warming
-- state, ARGV[2] '1' to force a new warm even when the tenant is warm or
-- warming, ARGV[3] the prefix of this format's states: a state of another
-- format counts as none. Returns 1 when it set the state.
local s = redis.call('GET', KEYS[1])
if ARGV[2] ~= '1' and s and string.sub(s, 1, string.len(ARGV[3])) == ARGV[3] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
return 1

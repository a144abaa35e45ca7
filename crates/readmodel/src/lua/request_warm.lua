-- Single-flight warm request on the tenant's slot: only the first caller
-- for a cold tenant moves it to warming. KEYS: state. ARGV[1] the warming
-- state, ARGV[2] '1' to force a new warm even when the tenant is warm or
-- warming. Returns 1 when it set the state.
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
return 1

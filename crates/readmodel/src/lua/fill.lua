-- Fills a status's document window from rank d, after guard.lua.
-- KEYS: fence, ZSET, documents, windows, the tenant's version. ARGV[3]
-- window size, ARGV[4] status, ARGV[5] the d the caller read, then member,
-- stored pairs in rank order. Stops at the first member no longer at the
-- next rank. Returns the new window, or -1 if it moved since the caller
-- read it.
local W = tonumber(ARGV[3])
local d = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
if d ~= tonumber(ARGV[5]) then return -1 end
local i = 6
while i < #ARGV and d < W do
  local at = redis.call('ZREVRANGE', KEYS[2], d, d)
  if at[1] ~= ARGV[i] then break end
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  d = d + 1
  i = i + 2
end
redis.call('HSET', KEYS[4], ARGV[4], d)
bump_version(KEYS[5])
return d

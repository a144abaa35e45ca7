-- Raises a partition's watermark if ARGV[1] holds the lease; each part
-- only grows (a replay after a hand-over publishes older marks).
-- KEYS: lease, watermark hash. ARGV: owner, at ms, through seconds or '',
-- through increment or '', then the hash's field names for those three.
-- Returns 1 when the lease holds.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local at = tonumber(ARGV[2])
if at > tonumber(redis.call('HGET', KEYS[2], ARGV[5]) or '0') then
  redis.call('HSET', KEYS[2], ARGV[5], ARGV[2])
end
if ARGV[3] ~= '' then
  local s, i = tonumber(ARGV[3]), tonumber(ARGV[4])
  local cs = tonumber(redis.call('HGET', KEYS[2], ARGV[6]) or '-1')
  local ci = tonumber(redis.call('HGET', KEYS[2], ARGV[7]) or '-1')
  if s > cs or (s == cs and i > ci) then
    redis.call('HSET', KEYS[2], ARGV[6], ARGV[3], ARGV[7], ARGV[4])
  end
end
return 1

-- Moves a tenant's write version (the key `key`) to a value it never had:
-- one more than it holds, or the server's clock in microseconds if that is
-- later. Equal versions are what lets a reader reuse what it read (kept
-- answers, the stream's digests), so the version must not repeat even when
-- Redis goes back in time (a restored RDB, a failover to a replica behind):
-- the writes after it run at a later clock than every value it lost.
local function bump_version(key)
  local now = redis.call('TIME')
  local v = math.max(tonumber(redis.call('GET', key) or '0') + 1, tonumber(now[1]) * 1000000 + tonumber(now[2]))
  redis.call('SET', key, string.format('%.0f', v))
end

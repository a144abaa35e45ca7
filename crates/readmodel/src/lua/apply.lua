-- Applies a closed set of operations in one slot, after guard.lua.
-- ARGV[3] window size W, ARGV[4] window floor F, ARGV[5] '1' for a tenant
-- script, whose KEYS[2] is the tenant's version, KEYS[3] its documents and
-- KEYS[4] its windows. Then operations: a name, then ARITY[name] arguments;
-- a key argument is an index into KEYS. Built by write::script::Batch.
--
-- In a tenant script, CPUT, CREM and DEL bump the version (version.lua).
-- CPUT and CREM keep the document window: the first d ranks of a ZSET,
-- and only they, have a document. Returns the statuses whose window is
-- below min(F, size) after the operations.
local ARITY = {CPUT = 5, CREM = 3, HSET = 3, HDEL = 2, SET = 2, DEL = 1, HINCRBY = 3}
local W = tonumber(ARGV[3])
local F = tonumber(ARGV[4])
local tenant = ARGV[5] == '1'
local VER, DOCS, DW = KEYS[2], KEYS[3], KEYS[4]
local touched = {}
local changed = false
local function window(status)
  return tonumber(redis.call('HGET', DW, status) or '0')
end
local function crem(z, status, member)
  local r = redis.call('ZREVRANK', z, member)
  if r then
    redis.call('ZREM', z, member)
    redis.call('HDEL', DOCS, member)
    local d = window(status)
    if r < d then redis.call('HSET', DW, status, d - 1) end
  end
end
local function cput(z, status, score, member, stored)
  crem(z, status, member)
  redis.call('ZADD', z, score, member)
  local r = redis.call('ZREVRANK', z, member)
  local d = window(status)
  if r < d or (r == d and d < W) then
    redis.call('HSET', DOCS, member, stored)
    d = d + 1
    if d > W then
      for _, out in ipairs(redis.call('ZREVRANGE', z, W, d - 1)) do redis.call('HDEL', DOCS, out) end
      d = W
    end
    redis.call('HSET', DW, status, d)
  end
end
-- CREMs of one ZSET in a row, as one ZREM: the same end state as
-- removing the members one by one. A member is in the window when its
-- rank is below d, and that does not change as others are removed:
-- removing a member of the window lowers d and the rank of every member
-- after it by one; removing one past the window lowers only the ranks
-- after it, all past the window already. So it can be read before any
-- removal. Scored above the window's last member: in it; scored the
-- same: its rank says.
local function crems(z, status, members)
  local present = redis.call('ZMSCORE', z, unpack(members))
  local d = window(status)
  -- The score at rank d - 1; none with d > 0: the window would reach past
  -- the ZSET's end, and every rank is below d.
  local last
  if d > 0 then last = tonumber(redis.call('ZREVRANGE', z, d - 1, d - 1, 'WITHSCORES')[2]) end
  local gone, seen, inside = {}, {}, 0
  for j, m in ipairs(members) do
    if present[j] and not seen[m] then
      seen[m] = true
      gone[#gone + 1] = m
      local s = tonumber(present[j])
      if d > 0 and (not last or s > last or (s == last and redis.call('ZREVRANK', z, m) < d)) then
        inside = inside + 1
      end
    end
  end
  if #gone > 0 then
    redis.call('ZREM', z, unpack(gone))
    redis.call('HDEL', DOCS, unpack(gone))
    if inside > 0 then redis.call('HSET', DW, status, d - inside) end
  end
end
-- CPUTs of one ZSET in a row, as one ZADD: the same end state as removing
-- the members already there (a replay, a re-warm) and then putting the
-- group one by one (a window can end longer than with each put after
-- its own removal; never shorter, never past W). The first member
-- without a document, b, stays the first one:
-- each new member ranked above b joins the window, the rest do not, and
-- the window is cut to W (the members past W lose their documents).
local function cputs(z, status, items)
  local members = {}
  for j, it in ipairs(items) do members[j] = it[2] end
  crems(z, status, members)
  local d = window(status)
  local b = redis.call('ZREVRANGE', z, d, d)[1]
  local scored = {}
  for _, it in ipairs(items) do
    scored[#scored + 1] = it[1]
    scored[#scored + 1] = it[2]
  end
  redis.call('ZADD', z, unpack(scored))
  local q
  if b then q = redis.call('ZREVRANK', z, b) else q = redis.call('ZCARD', z) end
  local nd = math.min(W, q)
  if nd > 0 then
    -- Only a member scored at least as high as the window's last can be in it.
    local last = tonumber(redis.call('ZREVRANGE', z, nd - 1, nd - 1, 'WITHSCORES')[2])
    for _, it in ipairs(items) do
      if tonumber(it[1]) >= last and redis.call('ZREVRANK', z, it[2]) < nd then
        redis.call('HSET', DOCS, it[2], it[3])
      end
    end
  end
  if q > nd then
    for _, out in ipairs(redis.call('ZREVRANGE', z, nd, q - 1)) do redis.call('HDEL', DOCS, out) end
  end
  if nd ~= d then redis.call('HSET', DW, status, nd) end
end
-- At most this many CPUTs in one ZADD, CREMs in one ZREM (Lua's unpack
-- has a limit).
local GROUP = 500
-- Where the operation at i and the same operations on the same key right
-- after it (at most GROUP in all) start.
local function run_of(i, n)
  local starts = {i}
  local j = i + 1 + n
  while #starts < GROUP and ARGV[j] == ARGV[i] and ARGV[j + 1] == ARGV[i + 1] and j + n <= #ARGV do
    starts[#starts + 1] = j
    j = j + 1 + n
  end
  return starts
end
local i = 6
while i <= #ARGV do
  local op = ARGV[i]
  local n = ARITY[op]
  if not n or i + n > #ARGV then return redis.error_reply('BADOP ' .. tostring(op) .. ' at ' .. i) end
  local k = KEYS[tonumber(ARGV[i + 1])]
  if (op == 'CPUT' or op == 'CREM') and not tenant then return redis.error_reply('BADOP ' .. op .. ' outside a tenant') end
  if op == 'CPUT' then
    local status, items = ARGV[i + 2], {}
    for _, j in ipairs(run_of(i, n)) do
      items[#items + 1] = {ARGV[j + 3], ARGV[j + 4], ARGV[j + 5]}
      i = j
    end
    if #items == 1 then cput(k, status, items[1][1], items[1][2], items[1][3]) else cputs(k, status, items) end
    touched[k] = status
  elseif op == 'CREM' then
    local status, members = ARGV[i + 2], {}
    for _, j in ipairs(run_of(i, n)) do
      members[#members + 1] = ARGV[j + 3]
      i = j
    end
    if #members == 1 then crem(k, status, members[1]) else crems(k, status, members) end
    touched[k] = status
  elseif op == 'HSET' then
    redis.call('HSET', k, ARGV[i + 2], ARGV[i + 3])
  elseif op == 'HDEL' then
    redis.call('HDEL', k, ARGV[i + 2])
  elseif op == 'SET' then
    redis.call('SET', k, ARGV[i + 2])
  elseif op == 'DEL' then
    redis.call('DEL', k)
    changed = true
  else
    redis.call('HINCRBY', k, ARGV[i + 2], ARGV[i + 3])
  end
  i = i + 1 + n
end
local needy = {}
if tenant and (changed or next(touched) ~= nil) then bump_version(VER) end
for z, status in pairs(touched) do
  local size = redis.call('ZCARD', z)
  if size == 0 then
    redis.call('HDEL', DW, status)
  elseif window(status) < math.min(F, size) then
    table.insert(needy, status)
  end
end
return needy

-- The check every write script starts with (callboard_readmodel::write::Guard).
-- ARGV[1] 'fence': the slot's fence (KEYS[1]) must not exceed the token
-- ARGV[2], and is raised to it; 'lease': the lease (KEYS[1]) must be held
-- by ARGV[2]; 'none': no check (tests and tools). A failed check is the
-- error code FENCED, which callers recognise by its code.
local mode = ARGV[1]
if mode == 'fence' then
  local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
  if fence > tonumber(ARGV[2]) then return redis.error_reply('FENCED a newer projector wrote here') end
  if fence < tonumber(ARGV[2]) then redis.call('SET', KEYS[1], ARGV[2]) end
elseif mode == 'lease' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return redis.error_reply('FENCED the lease is lost') end
elseif mode ~= 'none' then
  return redis.error_reply('BADGUARD ' .. tostring(mode))
end

-- Read entity states of one shard (all KEYS share one hash tag, so one Cluster slot).
--
-- KEYS[1..]  entity hashes
-- ARGV[1..]  the state fields in order, the decay reference 't' last
-- Returns one string: per key, #ARGV little-endian doubles; a missing field is 0, a
-- missing 't' is NaN (never written), so the caller can tell empty from zero.
local fmt = '<' .. string.rep('d', #ARGV)
local out = {}
local nan = 0 / 0
for i = 1, #KEYS do
  local raw = redis.call('HMGET', KEYS[i], unpack(ARGV))
  local v = {}
  for j = 1, #ARGV - 1 do v[j] = tonumber(raw[j]) or 0 end
  v[#ARGV] = tonumber(raw[#ARGV]) or nan
  out[i] = struct.pack(fmt, unpack(v))
end
return table.concat(out)

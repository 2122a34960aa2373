-- Read entity states of ANOTHER partition's shard for a batch, with the shard's version.
--
-- KEYS[1]     {hw:pQ}:writer       the token of the shard's last write (apply.lua)
-- KEYS[2]     {hw:pQ}:offsets      hash: topic -> next offset to apply
-- KEYS[3..]   {hw:pQ}:<entity>     entity hashes (those the caller has not cached),
--             then {hw:pQ}:~h2:<entity> their histories in the same order
-- ARGV[1]     topic
-- ARGV[2]     per key of KEYS[3..], the earliest event time of the rows that read it
-- ARGV[3..]   the state fields in order, the decay reference 't' last
--
-- Returns {writer, next_offset, states, histories}: states as read.lua packs them,
-- histories as in read_own.lua. All keys share one hash tag (one Cluster slot); (writer, next_offset) tells the caller whether its
-- cached states of this shard are still the shard's states (features/shard_cache.py).
local writer = redis.call('GET', KEYS[1]) or ''
local nxt = redis.call('HGET', KEYS[2], ARGV[1]) or '0'
local nf = #ARGV - 2
local mins = ARGV[2]
local fields = {}
for j = 1, nf do fields[j] = ARGV[j + 2] end
local hist = {}
local fmt = '<' .. string.rep('d', nf)
local out = {}
local nan = 0 / 0
local U = (#KEYS - 2) / 2
for i = 3, 2 + U do
  local raw = redis.call('HMGET', KEYS[i], unpack(fields))
  local v = {}
  for j = 1, nf - 1 do v[j] = tonumber(raw[j]) or 0 end
  v[nf] = tonumber(raw[nf]) or nan
  out[#out + 1] = struct.pack(fmt, unpack(v))
  local k = 8 * (i - 3) + 1
  if v[nf] >= struct.unpack('<d', mins, k) then
    local h = redis.call('GET', KEYS[i + U])
    if h then
      hist[#hist + 1] = i - 3
      hist[#hist + 1] = h
    end
  end
end
return {writer, nxt, table.concat(out), hist}

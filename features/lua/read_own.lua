-- Read what a batch of ONE source partition starts from, in its own shard (one slot).
--
-- KEYS[1]     {hw:pP}:offsets      hash: topic -> next offset to apply
-- KEYS[2]     {hw:pP}:pit:<topic>  the replay cache (hash: first offset -> entry)
-- KEYS[3]     {hw:pP}:writer       the token of the last write (apply.lua)
-- KEYS[4..]   {hw:pP}:<entity>     entity hashes (those the caller has not cached),
--             then {hw:pP}:~h2:<entity> their histories in the same order
-- ARGV[1]     topic
-- ARGV[2]     the batch's smallest offset
-- ARGV[3]     per key of KEYS[4..], the earliest event time of the batch's rows that
--             read it (little-endian doubles; +inf: none)
-- ARGV[4..]   the state fields in order, the decay reference 't' last
--
-- Returns {next_offset, states, cache, writer, histories}: states as read.lua packs them;
-- cache the replay cache entries (HVALS) when the batch starts below next_offset (a
-- replay), else {}; writer the token ('' if never written); histories {i, h, ...}: the
-- history (features/asof.py) of every key i (0-based) whose 't' is not older
-- than its earliest row (its state alone cannot say what was there before that row). (writer, next_offset) is the shard's
-- version: the caller's cached states count only if they were taken at this version.
-- The caller computes the batch from these and writes it with apply.lua, which checks
-- that next_offset has not moved in between (the fence).
local nxt = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local writer = redis.call('GET', KEYS[3]) or ''
local nf = #ARGV - 3
local mins = ARGV[3]
local fields = {}
for j = 1, nf do fields[j] = ARGV[j + 3] end
local hist = {}
local fmt = '<' .. string.rep('d', nf)
local out = {}
local nan = 0 / 0
local U = (#KEYS - 3) / 2
for i = 4, 3 + U do
  local raw = redis.call('HMGET', KEYS[i], unpack(fields))
  local v = {}
  for j = 1, nf - 1 do v[j] = tonumber(raw[j]) or 0 end
  v[nf] = tonumber(raw[nf]) or nan
  out[#out + 1] = struct.pack(fmt, unpack(v))
  local k = 8 * (i - 4) + 1
  if v[nf] >= struct.unpack('<d', mins, k) then
    local h = redis.call('GET', KEYS[i + U])
    if h then
      hist[#hist + 1] = i - 4
      hist[#hist + 1] = h
    end
  end
end
local cache = {}
if tonumber(ARGV[2]) < tonumber(nxt) then cache = redis.call('HVALS', KEYS[2]) end
return {nxt, table.concat(out), cache, writer, hist}

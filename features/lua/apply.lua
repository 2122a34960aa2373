-- Write one computed batch of ONE source partition to its shard, atomically and fenced.
--
-- KEYS[1]     {hw:pP}:offsets      hash: topic -> next offset to apply
-- KEYS[2]     {hw:pP}:pit:<topic>  the replay cache (hash: first offset -> entry)
-- KEYS[3]     {hw:pP}:writer       the token of the last write (set to ARGV[8])
-- KEYS[4..]   {hw:pP}:<entity>     the entities the batch changed
-- ARGV[1]     topic
-- ARGV[2]     expected next offset: what the batch was computed from (read_own.lua)
-- ARGV[3]     the new next offset (the batch's largest applied offset + 1)
-- ARGV[4]     the state fields, comma separated, 't' last
-- ARGV[5]     new states: per entity key, one little-endian double per field
-- ARGV[6]     the replay-cache entry for this batch (opaque bytes, written by the caller)
-- ARGV[7]     replay cache size: how many recent batches keep their entries
-- ARGV[8]     a fresh random token naming the shard's new state (features/shard_cache.py)
--
-- Returns {1, next_offset} when written, {0, stored next offset} when the fence failed.
--
-- The fence: the caller computed the new states from the shard as it was when the next
-- offset was ARGV[2]. Only this script moves the next offset, and it always moves it
-- forward, so an unchanged next offset means nobody wrote the shard in between. If it
-- moved (another worker took the partition over during a rebalance, or a zombie worker
-- raced us), nothing is written: the caller re-reads and recomputes. Writing each
-- entity's final state and advancing the offset in one script is what keeps counter
-- updates idempotent per (topic, partition, offset).
local topic = ARGV[1]
local cur = redis.call('HGET', KEYS[1], topic) or '0'
if tonumber(cur) ~= tonumber(ARGV[2]) then return {0, cur} end
local fields = {}
for f in string.gmatch(ARGV[4], '[^,]+') do fields[#fields + 1] = f end
local nf = #fields
local fmt = '<' .. string.rep('d', nf)
local blob = ARGV[5]
local pos = 1
local args = {}
for j = 1, nf do args[2 * j - 1] = fields[j] end
local format = string.format
for i = 4, #KEYS do
  local v = {struct.unpack(fmt, blob, pos)}
  pos = v[nf + 1]
  for j = 1, nf do args[2 * j] = format('%.17g', v[j]) end
  redis.call('HSET', KEYS[i], unpack(args))
end
local keep = tonumber(ARGV[7])
if keep > 0 then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[6])
  local firsts = redis.call('HKEYS', KEYS[2])
  if #firsts > keep then
    local nums = {}
    for i, f in ipairs(firsts) do nums[i] = tonumber(f) end
    table.sort(nums)
    for i = 1, #nums - keep do redis.call('HDEL', KEYS[2], string.format('%d', nums[i])) end
  end
end
redis.call('HSET', KEYS[1], topic, ARGV[3])
redis.call('SET', KEYS[3], ARGV[8])
return {1, ARGV[3]}

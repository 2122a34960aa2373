-- Event-time guarded attribute write (Feast-style): the fields in ARGV are merged into
-- the stored ones only if ARGV[1] (event time) is not older than the stored '_ts', so a
-- late or replayed write never overwrites newer attributes.
-- KEYS[1]  hw:attrs:<kind>:<id>
-- ARGV[1]  event time; ARGV[2..] field, value pairs (values JSON-encoded)
-- Returns 1 if written, 0 if the write was older than what is stored.
local stored = tonumber(redis.call('HGET', KEYS[1], '_ts') or '')
local ts = tonumber(ARGV[1])
if stored and ts < stored then return 0 end
redis.call('HSET', KEYS[1], '_ts', ARGV[1], unpack(ARGV, 2))
return 1

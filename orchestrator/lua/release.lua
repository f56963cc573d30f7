-- Gives back lease ARGV[5] on node ARGV[4]. Returns 1, or 0 when the lease was already gone
-- (released before, expired, or its node was removed).
local id = ARGV[4]
if redis.call('ZREM', leases_key(id), ARGV[5]) == 0 then return 0 end
refresh_load(id, now_ms(), true)
return 1

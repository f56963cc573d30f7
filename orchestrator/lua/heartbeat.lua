-- Keeps node ARGV[4] alive for another ARGV[5] ms, gives back its expired leases, and does a
-- bounded sweep of other nodes. Returns 1, or 0 when the node is not registered (its hash
-- expired, or Redis lost it): the caller then registers it again.
local id, ttl = ARGV[4], tonumber(ARGV[5])
local now = now_ms()
if redis.call('PEXPIRE', node_key(id), ttl) == 0 then return 0 end
redis.call('ZADD', K_NODES, now + ttl, id)
redis.call('HSET', node_key(id), 'heartbeat_ms', now)
refresh_load(id, now)
sweep(now)
return 1

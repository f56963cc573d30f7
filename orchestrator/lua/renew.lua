-- Extends lease ARGV[5] on node ARGV[4] to now + ARGV[6] ms. A lease that is gone (it expired,
-- or Redis restarted empty) is taken again if the node has room, so holders that keep renewing
-- rebuild the load Redis lost. Returns {expiry ms, load}, or false when the node is gone or
-- the lease is gone and the node full.
local id, lease_id = ARGV[4], ARGV[5]
local now = now_ms()
local load, capacity = refresh_load(id, now)
if not capacity then return false end
local held = redis.call('ZSCORE', leases_key(id), lease_id)
if not held and load >= capacity then return false end
local expiry = now + tonumber(ARGV[6])
redis.call('ZADD', leases_key(id), expiry, lease_id)
if not held then
  load = load + 1
  redis.call('ZADD', K_DUE, 'LT', expiry, id)
  set_score(id, load / capacity)
end
return {tostring(expiry), tostring(load)}

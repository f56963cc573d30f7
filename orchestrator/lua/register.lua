-- Registers node ARGV[4] (or refreshes it) for ARGV[5] ms. ARGV[6..] are field/value pairs of
-- its hash (kind, address, models, capacity, labels, version, metrics_address); KEYS are the
-- load sorted sets it belongs to. Statistics fields the node wrote earlier are kept. A node that was not registered
-- (new, or lost with a Redis restart) gets a 'join' event; if its old entry had expired but
-- was not swept yet, that one is removed first, with an 'expire' event.
-- Returns 1 when the node joined, 0 when it was refreshed.
local id, ttl = ARGV[4], tonumber(ARGV[5])
local now = now_ms()
local node = node_key(id)
local joined = redis.call('EXISTS', node) == 0
if joined and redis.call('HEXISTS', K_ROUTES, id) == 1 then remove_node(id, 'expire') end

local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', node, unpack(fields))
redis.call('HSET', node, 'heartbeat_ms', now)
redis.call('PEXPIRE', node, ttl)
redis.call('ZADD', K_NODES, now + ttl, id)
local info = redis.call('HMGET', node, 'kind', 'address', 'capacity')

local old = route_of(id)
if old then
  local keep = {}
  for _, key in ipairs(KEYS) do keep[key] = true end
  for _, key in ipairs(old.keys) do
    if not keep[key] then redis.call('ZREM', key, id) end
  end
end
redis.call('HSET', K_ROUTES, id, cjson.encode({kind = info[1], address = info[2], keys = KEYS}))

local leases = leases_key(id)
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
local score = redis.call('ZCARD', leases) / tonumber(info[3])
for _, key in ipairs(KEYS) do redis.call('ZADD', key, score, id) end

if joined then emit({'type', 'join', 'node', id, 'kind', info[1], 'address', info[2]}) end
sweep(now)
if joined then return 1 end
return 0

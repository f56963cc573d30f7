-- Shared by every script: orchestrator.registry prepends this file to each one before
-- register_script. The key layout is documented in orchestrator/placement.py and mirrored
-- by orchestrator.registry.Keyspace; the two must agree.
--
-- ARGV[1] key prefix, ARGV[2] approximate MAXLEN of the event stream, ARGV[3] how many
-- expired nodes and overdue lease sets one call may clean up. Script arguments start at ARGV[4].
-- Times are milliseconds of the Redis server clock, so clients need no synchronised clocks.

local PREFIX = ARGV[1]
local EVENTS_MAXLEN = ARGV[2]
local SWEEP_LIMIT = tonumber(ARGV[3])
local K_NODES = PREFIX .. ':nodes'
local K_ROUTES = PREFIX .. ':routes'
local K_DUE = PREFIX .. ':lease-due'
local K_EVENTS = PREFIX .. ':events'

local function node_key(id) return PREFIX .. ':node:' .. id end
local function leases_key(id) return PREFIX .. ':leases:' .. id end
local function session_key(session) return PREFIX .. ':session:' .. session end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function emit(fields)
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', unpack(fields))
end

-- {kind=, address=, keys={load sorted sets}}; kept apart from the node hash so that a node
-- whose hash expired can still be taken out of every sorted set it was in.
local function route_of(id)
  local raw = redis.call('HGET', K_ROUTES, id)
  if raw then return cjson.decode(raw) end
  return nil
end

local function set_score(id, score)
  local route = route_of(id)
  if route then
    for _, key in ipairs(route.keys) do redis.call('ZADD', key, 'XX', score, id) end
  end
end

-- After the lease set of `id` changed: its score becomes load / capacity and its entry in the
-- lease-due index becomes the expiry of its oldest lease (or goes when it holds none).
local function sync_load(id, load, capacity)
  local first = redis.call('ZRANGE', leases_key(id), 0, 0, 'WITHSCORES')
  if first[2] then
    redis.call('ZADD', K_DUE, first[2], id)
  else
    redis.call('ZREM', K_DUE, id)
  end
  if capacity then set_score(id, load / capacity) end
end

-- Drops the expired leases of `id` and, when its lease set changed (`changed`: the caller
-- changed it too), syncs its score. Returns its live lease count and capacity (nil when its
-- hash is gone).
local function refresh_load(id, now, changed)
  local leases = leases_key(id)
  local removed = redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  local load = redis.call('ZCARD', leases)
  local capacity = tonumber(redis.call('HGET', node_key(id), 'capacity'))
  if changed or removed > 0 then sync_load(id, load, capacity) end
  return load, capacity
end

-- Takes `id` out of rotation and deletes everything it owns; `event` is 'leave' or 'expire'.
local function remove_node(id, event)
  local route = route_of(id) or {keys = {}}
  for _, key in ipairs(route.keys) do redis.call('ZREM', key, id) end
  redis.call('HDEL', K_ROUTES, id)
  redis.call('ZREM', K_NODES, id)
  redis.call('ZREM', K_DUE, id)
  redis.call('DEL', node_key(id), leases_key(id))
  emit({'type', event, 'node', id, 'kind', route.kind or '', 'address', route.address or ''})
end

-- Bounded housekeeping run by register, heartbeat and pick: nodes whose heartbeat deadline
-- passed are removed (with an 'expire' event), and nodes holding an expired lease get it back.
-- Returns how many nodes it removed.
local function sweep(now)
  local removed = 0
  local dead = redis.call('ZRANGEBYSCORE', K_NODES, '-inf', '(' .. now, 'LIMIT', 0, SWEEP_LIMIT)
  for _, id in ipairs(dead) do
    local ttl = redis.call('PTTL', node_key(id))
    if ttl > 0 then
      redis.call('ZADD', K_NODES, now + ttl, id)
    else
      remove_node(id, 'expire')
      removed = removed + 1
    end
  end
  local due = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', now, 'LIMIT', 0, SWEEP_LIMIT)
  for _, id in ipairs(due) do refresh_load(id, now, true) end
  return removed
end

-- Picks a node from the load sorted set KEYS[1] and takes one of its slots, atomically.
-- ARGV[4] lease id, ARGV[5] lease TTL ms, ARGV[6] session id ('' for none), ARGV[7] affinity
-- TTL ms, ARGV[8] random seed, ARGV[9] window, ARGV[10..] node ids to leave out.
-- Policy, in order:
--   1. the node the session is bound to, if it is still in KEYS[1], alive, not left out and
--      below capacity;
--   2. otherwise power of two choices: two random nodes among the `window` least utilised
--      ones with a free slot, the less utilised of the two. A failed affinity emits a
--      'failover' event.
-- Returns {node, address, load after the pick, capacity, lease expiry ms, 'affinity' | 'p2c'},
-- or false when every eligible node is at capacity (or there is none).
local route = KEYS[1]
local lease_id, lease_ttl, session = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local affinity_ttl, window = tonumber(ARGV[7]), tonumber(ARGV[9])
local excluded = {}
for i = 10, #ARGV do excluded[ARGV[i]] = true end
local now = now_ms()
sweep(now)

-- {id, load, capacity, address} when `id` can take one more lease; nil otherwise. A node
-- whose hash is gone is removed here, so a dead node leaves rotation the first time it is met.
local function candidate(id)
  local load, capacity = refresh_load(id, now)
  if not capacity then
    remove_node(id, 'expire')
    return nil
  end
  if load >= capacity then return nil end
  return {id, load, capacity, redis.call('HGET', node_key(id), 'address')}
end

local chosen, how, sticky, reason = nil, 'p2c', false, nil
if session ~= '' then
  sticky = redis.call('GET', session_key(session))
  if sticky then
    if excluded[sticky] then
      reason = 'excluded'
    elseif not redis.call('ZSCORE', route, sticky) then
      reason = 'gone'
    else
      chosen = candidate(sticky)
      if chosen then how = 'affinity' elseif redis.call('EXISTS', node_key(sticky)) == 1 then
        reason = 'full'
      else
        reason = 'gone'
      end
    end
  end
end

-- Power of two choices over the page of the `window` least utilised nodes with a free slot
-- (score < 1): sample without replacement until two are confirmed eligible (alive, not left
-- out, below capacity after pruning), keep the less utilised. A page with no eligible node
-- moves the window on; removing a dead node shifts the ranks after it, hence the correction.
if not chosen then
  math.randomseed(tonumber(ARGV[8]))
  local offset = 0
  while not chosen do
    local page = redis.call('ZRANGEBYSCORE', route, '-inf', '(1', 'LIMIT', offset, window)
    if #page == 0 then return false end
    local pool, gone, confirmed = {}, 0, 0
    for _, id in ipairs(page) do
      if not excluded[id] and id ~= sticky then pool[#pool + 1] = id end
    end
    while #pool > 0 and confirmed < 2 do
      local id = table.remove(pool, math.random(#pool))
      local c = candidate(id)
      if c then
        confirmed = confirmed + 1
        if not chosen or c[2] / c[3] < chosen[2] / chosen[3] then chosen = c end
      elseif not redis.call('ZSCORE', route, id) then
        gone = gone + 1
      end
    end
    offset = offset + #page - gone
  end
end

local id, load, capacity = chosen[1], chosen[2] + 1, chosen[3]
local expiry = now + lease_ttl
redis.call('ZADD', leases_key(id), expiry, lease_id)
redis.call('ZADD', K_DUE, 'LT', expiry, id)
set_score(id, load / capacity)
if session ~= '' then
  redis.call('SET', session_key(session), id, 'PX', affinity_ttl)
  if sticky and sticky ~= id then
    emit({'type', 'failover', 'node', id, 'session', session, 'from', sticky, 'reason', reason})
  end
end
return {id, chosen[4], tostring(load), tostring(capacity), tostring(expiry), how}

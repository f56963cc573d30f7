-- Node ARGV[4] leaves: out of rotation at once, its leases dropped, a 'leave' event.
-- Returns 1, or 0 when it was not registered.
local id = ARGV[4]
if redis.call('EXISTS', node_key(id)) == 0 and redis.call('HEXISTS', K_ROUTES, id) == 0 then
  return 0
end
remove_node(id, 'leave')
return 1

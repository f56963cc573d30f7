-- Writes the field/value pairs ARGV[5..] into the hash of node ARGV[4], only while it is
-- registered (a plain HSET would resurrect an expired node as a hash without TTL).
-- Returns 1, or 0 when the node is not registered.
local node = node_key(ARGV[4])
if redis.call('EXISTS', node) == 0 then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', node, unpack(fields))
return 1

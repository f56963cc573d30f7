-- Housekeeping on demand (register, heartbeat and pick also do it as they go): removes up to
-- ARGV[3] expired nodes and gives back the expired leases of up to ARGV[3] nodes.
-- Returns how many expired nodes it removed.
return sweep(now_ms())

-- Give back n images charged by a request whose inference then failed.
-- KEYS[1] = <prefix>:{<key_id>}:key, KEYS[2] = <prefix>:{<key_id>}:audit
-- ARGV    = n, model, mode, request_id, audit_maxlen
-- The budget is credited (never below zero) and the GCRA arrival time moved back by as many emission
-- intervals as images were actually given back (give = min(n, used); never before now), so a refund
-- larger than what was used cannot buy rate. Returns the key's new `used`.
local n = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'used', 'rate', 'tat')
if not h[1] then return -1 end
local used = tonumber(h[1])
local give = math.min(n, used)
used = redis.call('HINCRBY', KEYS[1], 'used', -give)
local rate = tonumber(h[2] or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if rate > 0 and h[3] then
  local tat = tonumber(h[3]) - give * (1000000 / rate)
  if tat < now then tat = now end
  redis.call('HSET', KEYS[1], 'tat', string.format('%d', math.ceil(tat)))
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
  'event', 'refund', 'n', give, 'model', ARGV[2], 'mode', ARGV[3], 'request_id', ARGV[4],
  'used', used, 't_us', string.format('%d', now))
return used

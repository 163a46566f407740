-- Charge n images to one API key: lifetime budget AND GCRA rate limit, both or neither.
-- KEYS[1] = <prefix>:{<key_id>}:key     (hash: budget, used, rate, burst, tat, revoked)
-- KEYS[2] = <prefix>:{<key_id>}:audit   (stream of charge / refund events)
-- ARGV    = n, model, mode, request_id (the server's), audit_maxlen, client_request_id ('' if none)
-- Both keys share the hash tag {<key_id>}, so the script also runs on Redis Cluster.
-- Time is the server's TIME (microseconds), never the caller's clock.
-- Returns {status, used, budget, rate_remaining, reset_us, retry_after_us, now_us}
--   status: 0 charged, 1 budget exhausted, 2 rate limited, 3 batch larger than burst,
--           -1 unknown key, -2 revoked.
local n = tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'budget', 'used', 'rate', 'burst', 'tat', 'revoked')
if not h[1] then return {-1, 0, 0, 0, 0, 0, 0} end
if h[6] == '1' then return {-2, 0, 0, 0, 0, 0, 0} end
local budget = tonumber(h[1])
local used = tonumber(h[2] or '0')
local rate = tonumber(h[3] or '0')
local burst = tonumber(h[4] or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local tat = tonumber(h[5] or '0')
if tat < now then tat = now end
local interval = 0
local remaining = -1
local reset = 0
if rate > 0 then
  interval = 1000000 / rate
  local tolerance = interval * burst
  remaining = math.floor((tolerance - (tat - now)) / interval)
  reset = math.ceil(tat - now)
  if n > burst then
    return {3, used, budget, remaining, reset, 0, now}
  end
  local new_tat = tat + n * interval
  local allow_at = new_tat - tolerance
  if allow_at > now then
    return {2, used, budget, remaining, reset, math.ceil(allow_at - now), now}
  end
end
if budget >= 0 and used + n > budget then
  return {1, used, budget, remaining, reset, 0, now}
end
if rate > 0 then
  local new_tat = tat + n * interval
  redis.call('HSET', KEYS[1], 'tat', string.format('%d', math.ceil(new_tat)))
  remaining = math.floor((interval * burst - (new_tat - now)) / interval)
  reset = math.ceil(new_tat - now)
end
used = redis.call('HINCRBY', KEYS[1], 'used', n)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
  'event', 'charge', 'n', n, 'model', ARGV[2], 'mode', ARGV[3], 'request_id', ARGV[4],
  'client_request_id', ARGV[6] or '', 'used', used, 't_us', string.format('%d', now))
return {0, used, budget, remaining, reset, 0, now}

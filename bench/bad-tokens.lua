-- bench/bad-tokens.lua: wrk script for bench/bad-tokens (see bench/README.md).
--
-- Every request carries a fresh random credential in X-Auth-Token:
--
--   wrk ... -s bench/bad-tokens.lua URL -- tg      `tg_` + 43 base64url + 6 base62 chars:
--                                                  the right length and alphabet, so only the
--                                                  CRC-32 checksum can reject it (it is right
--                                                  with probability 62^-6, about 2e-11)
--   wrk ... -s bench/bad-tokens.lua URL -- other   52 random base64url chars, never `tg_...`
--
-- Responses are counted by status; done() prints one line that bench/bad-tokens parses:
--   bad-tokens: responses=N status401=N non401=N first_non401=STATUS

local B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
-- First character of an `other` string: anything but `t`, so it can never start with `tg_`.
local NOT_T = (B64URL:gsub("t", ""))

local function chars(alphabet)
    local t = {}
    for i = 1, #alphabet do t[i] = alphabet:sub(i, i) end
    return t
end
local b64url, base62, not_t = chars(B64URL), chars(BASE62), chars(NOT_T)

-- setup() runs in wrk's main Lua state, once per thread: keep the threads so that done() can
-- add up their counters, and give each a distinct number for its seed.
local threads = {}
function setup(thread)
    threads[#threads + 1] = thread
    thread:set("thread_no", #threads)
end

-- Per-thread state (each wrk thread has its own Lua state; done() reads these globals).
status401, non401, first_non401 = 0, 0, "-"

local mode, random, concat, buf, headers

local function urandom_seed()
    local f = io.open("/dev/urandom", "rb")
    if not f then return 0 end
    local s = f:read(4)
    f:close()
    local b1, b2, b3, b4 = s:byte(1, 4)
    return ((b1 * 256 + b2) * 256 + b3) * 256 + b4
end

function init(args)
    mode = args[1] or "tg"
    if mode ~= "tg" and mode ~= "other" then
        error("bad-tokens.lua: mode must be 'tg' or 'other', not '" .. tostring(mode) .. "'")
    end
    -- Seeded per thread: OS randomness, the time and the thread number.
    math.randomseed((urandom_seed() + os.time() * 7919 + (thread_no or 0) * 104729) % 2147483647)
    random, concat, buf = math.random, table.concat, {}
    headers = {}  -- reused: wrk.format adds Host to it once
end

function request()
    local n = 0
    if mode == "tg" then
        buf[1], n = "tg_", 1
        for _ = 1, 43 do n = n + 1; buf[n] = b64url[random(64)] end
        for _ = 1, 6 do n = n + 1; buf[n] = base62[random(62)] end
    else
        buf[1], n = not_t[random(#not_t)], 1
        for _ = 1, 51 do n = n + 1; buf[n] = b64url[random(64)] end
    end
    headers["X-Auth-Token"] = concat(buf, "", 1, n)
    return wrk.format(nil, nil, headers)
end

function response(status, _, _)
    if status == 401 then
        status401 = status401 + 1
    else
        non401 = non401 + 1
        if first_non401 == "-" then first_non401 = tostring(status) end
    end
end

function done(_, _, _)
    local ok, bad, first = 0, 0, "-"
    for _, t in ipairs(threads) do
        ok = ok + t:get("status401")
        bad = bad + t:get("non401")
        if first == "-" then first = t:get("first_non401") end
    end
    io.write(string.format("bad-tokens: responses=%d status401=%d non401=%d first_non401=%s\n",
        ok + bad, ok, bad, first))
end

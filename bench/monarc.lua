-- wrk script of `make bench-monarc` (bench/monarc.py):
--   wrk -s bench/monarc.lua URL -- REQUESTS API_KEY USER_AGENT PREFIX
-- REQUESTS    a file of requests, one a line: METHOD <tab> PATH <tab> BODY ("-": no body),
--             sent in turn; BODY is JSON on one line, sent as application/json, also with
--             GET (the MONARC front office sends v1 GET parameters as a JSON body)
-- API_KEY     sent as X-API-KEY ("-": none)
-- USER_AGENT  sent as User-Agent ("-": wrk's default)
-- PREFIX      8 hex digits: every "@ANR@" in a body becomes a new UUID PREFIX-tttt-4000-8000-nnnnnnnnnnnn
--             (t: the wrk thread), so that each batch POST is for a new analysis
-- Requests without "@ANR@" are built once, in init, so wrk spends no time on them.
local requests, fresh, n, counter = {}, {}, 0, 0
local thread_no = 0

function setup(thread)
  thread_no = thread_no + 1
  thread:set("tid", thread_no)
end

local function split(line)
  local method, path, body = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
  return method, path, body
end

function init(args)
  local headers = {}
  if args[2] and args[2] ~= "-" then headers["X-API-KEY"] = args[2] end
  if args[3] and args[3] ~= "-" then headers["User-Agent"] = args[3] end
  prefix = args[4] or "0badcafe"
  for line in io.lines(args[1]) do
    if #line > 0 then
      local method, path, body = split(line)
      local h = {}
      for k, v in pairs(headers) do h[k] = v end
      if body == "-" then
        body = nil
      else
        h["Content-Type"] = "application/json"
      end
      local i = #requests + 1
      if body and body:find("@ANR@", 1, true) then
        requests[i] = false
        fresh[i] = { method, path, h, body }
      else
        requests[i] = wrk.format(method, path, h, body)
      end
    end
  end
end

function request()
  n = n % #requests + 1
  local r = requests[n]
  if r then return r end
  local f = fresh[n]
  counter = counter + 1
  local anr = string.format("%s-%04x-4000-8000-%012d", prefix, tid or 0, counter)
  return wrk.format(f[1], f[2], f[3], (f[4]:gsub("@ANR@", anr)))
end

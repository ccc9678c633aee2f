-- wrk script for every scenario of the bench:
--   wrk -s bench/request.lua URL -- METHOD PATHS BODY API_KEY
-- METHOD   GET or POST
-- PATHS    a file of request paths, one a line, sent in turn ("-": the URL's path)
-- BODY     a file sent as the application/json body ("-": no body)
-- API_KEY  sent as the X-API-KEY header ("-": no header)
-- The requests are built once, in init, so wrk spends no time on them.
local requests, n = {}, 0

function init(args)
  local method, paths, body = args[1] or "GET", { wrk.path }, nil
  local headers = {}
  if args[2] and args[2] ~= "-" then
    paths = {}
    for line in io.lines(args[2]) do
      if #line > 0 then paths[#paths + 1] = line end
    end
  end
  if args[3] and args[3] ~= "-" then
    local f = assert(io.open(args[3], "rb"))
    body = f:read("*a")
    f:close()
    headers["Content-Type"] = "application/json"
  end
  if args[4] and args[4] ~= "-" then headers["X-API-KEY"] = args[4] end
  for i, path in ipairs(paths) do
    requests[i] = wrk.format(method, path, headers, body)
  end
end

function request()
  n = n % #requests + 1
  return requests[n]
end

--- Expectations for regression recipes: `expect(x):near(y, tol)` raises an error that says
--- what was expected, what came, and where.
---@module "wick.expect"
local M = {}
local Expectation = {}
Expectation.__index = Expectation

local function fail(msg)
  error("expectation failed: " .. msg, 3)
end

local function show(v)
  if type(v) == "number" then return ("%.6g"):format(v) end
  return tostring(v)
end

function Expectation:to_be(y)
  if self.value ~= y then fail(("expected %s, got %s"):format(show(y), show(self.value))) end
  return self
end

function Expectation:near(y, tol)
  tol = tol or 1e-6
  if type(self.value) ~= "number" or math.abs(self.value - y) > tol then
    fail(("expected %s within %s, got %s"):format(show(y), show(tol), show(self.value)))
  end
  return self
end

function Expectation:below(y)
  if not (self.value < y) then fail(("expected a value below %s, got %s"):format(show(y), show(self.value))) end
  return self
end

function Expectation:above(y)
  if not (self.value > y) then fail(("expected a value above %s, got %s"):format(show(y), show(self.value))) end
  return self
end

--- The mean of each window of k values is below the mean of the window before it.
function Expectation:decreasing(opts)
  local k = (opts and opts.window) or 1
  local xs = self.value
  if type(xs) ~= "table" or #xs < 2 * k then
    fail(("decreasing needs a list of at least %d numbers"):format(2 * k))
  end
  local function mean(i) local s = 0 for j = i, i + k - 1 do s = s + xs[j] end return s / k end
  local prev = mean(1)
  for i = 1 + k, #xs - k + 1, k do
    local m = mean(i)
    if not (m < prev) then
      fail(("expected decreasing values (window %d), but the mean rose from %s to %s at index %d"):format(k, show(prev), show(m), i))
    end
    prev = m
  end
  return self
end

--- Compare a list of numbers with golden/NAME.json beside the test file (`wick test --bless`
--- writes it). opts: rtol (1e-5), atol (1e-8).
function M.golden(name, values, opts)
  opts = opts or {}
  local ok, msg = wick.__golden(name, values, opts.rtol or 1e-5, opts.atol or 1e-8)
  if not ok then error("expectation failed: " .. msg, 2) end
end

setmetatable(M, { __call = function(_, v) return setmetatable({ value = v }, Expectation) end })
return M

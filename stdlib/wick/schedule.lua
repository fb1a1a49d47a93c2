--- Learning-rate schedules. Each returns a function of the step (1-based) that gives the
--- learning rate, so a resumed run needs no arithmetic: lr(step) is the same either way.
---@module "wick.schedule"
local M = {}

local function check(fname, opts, keys)
  if type(opts) ~= "table" then
    error(("%s expects an options table: %s{ lr = 1e-3, ... }"):format(fname, fname), 3)
  end
  for k in pairs(opts) do
    if not keys[k] then
      local names = {}
      for name in pairs(keys) do names[#names + 1] = name end
      table.sort(names)
      error(("unknown option '%s' for %s; valid options: %s"):format(tostring(k), fname, table.concat(names, ", ")), 3)
    end
  end
end

local function need(fname, opts, key)
  local v = opts[key]
  if type(v) ~= "number" then
    error(("%s: option '%s' must be a number, got %s"):format(fname, key, type(v)), 3)
  end
  return v
end

--- Constant learning rate.
---@param opts {lr: number}
---@return fun(step: integer): number
function M.constant(opts)
  check("schedule.constant", opts, { lr = true })
  local lr = need("schedule.constant", opts, "lr")
  return function(_) return lr end
end

--- Linear warmup, then cosine decay to min_lr at `steps`.
---@param opts {lr: number, warmup?: integer, steps: integer, min_lr?: number}
---@return fun(step: integer): number
function M.cosine(opts)
  check("schedule.cosine", opts, { lr = true, warmup = true, steps = true, min_lr = true })
  local lr = need("schedule.cosine", opts, "lr")
  local steps = need("schedule.cosine", opts, "steps")
  local warmup = opts.warmup or 0
  local min_lr = opts.min_lr or lr * 0.1
  return function(step)
    if step <= warmup then return lr * step / math.max(1, warmup) end
    if step >= steps then return min_lr end
    local t = (step - warmup) / math.max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
  end
end

--- Warmup-stable-decay: linear warmup, a flat stretch, then a linear decay over the last
--- `decay` fraction of the steps (0.2 by default) down to min_lr.
---@param opts {lr: number, warmup?: integer, steps: integer, decay?: number, min_lr?: number}
---@return fun(step: integer): number
function M.wsd(opts)
  check("schedule.wsd", opts, { lr = true, warmup = true, steps = true, decay = true, min_lr = true })
  local lr = need("schedule.wsd", opts, "lr")
  local steps = need("schedule.wsd", opts, "steps")
  local warmup = opts.warmup or 0
  local min_lr = opts.min_lr or 0
  local decay_steps = math.max(1, math.floor(steps * (opts.decay or 0.2)))
  local decay_start = steps - decay_steps
  return function(step)
    if step <= warmup then return lr * step / math.max(1, warmup) end
    if step <= decay_start then return lr end
    if step >= steps then return min_lr end
    local t = (step - decay_start) / decay_steps
    return lr + (min_lr - lr) * t
  end
end

--- Linear warmup to lr, then constant.
---@param opts {lr: number, warmup: integer}
---@return fun(step: integer): number
function M.warmup(opts)
  check("schedule.warmup", opts, { lr = true, warmup = true })
  local lr = need("schedule.warmup", opts, "lr")
  local warmup = opts.warmup or 0
  return function(step)
    if step <= warmup then return lr * step / math.max(1, warmup) end
    return lr
  end
end

return M

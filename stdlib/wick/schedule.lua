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

--- Phases of a run, each `{ steps = N, lr = number|fun(step, step_in_phase), mix = {...},
--- batch = B, seq_len = S }`. `phases:apply(step, session, loader)` sets the learning rate and,
--- when a new phase begins (or the run resumes inside one), the loader's mixture and shape.
---@param list table[]
function M.phases(list)
  if type(list) ~= "table" or #list == 0 then
    error("schedule.phases expects a list of phases: { {steps = 100, lr = 1e-3}, ... }", 2)
  end
  local P = { total = 0, list = {} }
  for i, p in ipairs(list) do
    check("schedule.phases entry " .. i, p, { steps = true, lr = true, mix = true, batch = true, seq_len = true, name = true })
    local n = need("schedule.phases entry " .. i, p, "steps")
    local phase = { index = i, start = P.total + 1, stop = P.total + n, steps = n,
                    lr = p.lr, mix = p.mix, batch = p.batch, seq_len = p.seq_len, name = p.name or ("phase " .. i) }
    P.list[i] = phase
    P.total = P.total + n
  end

  --- The phase holding `step` (the last phase for steps past the end).
  function P:at(step)
    for _, p in ipairs(self.list) do
      if step <= p.stop then return p end
    end
    return self.list[#self.list]
  end

  function P:apply(step, session, loader)
    local p = self:at(step)
    if self.current ~= p.index then
      self.current = p.index
      if loader and (p.mix or p.batch or p.seq_len) then
        loader:set{ mix = p.mix, batch = p.batch, seq_len = p.seq_len }
      end
    end
    if session and p.lr then
      local lr = p.lr
      if type(lr) == "function" then lr = lr(step, step - p.start + 1) end
      session.lr = lr
    end
    return p
  end

  return P
end

return M

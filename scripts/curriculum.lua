-- Data the recipe writes: a length curriculum over the shipped sample (short documents
-- first, through a Lua filter that runs on the data thread) with a synthetic copy task mixed
-- in (a source written in Lua, resumable through state/restore).
--   wick run scripts/curriculum.lua [-- --steps N]
local schedule = require("wick.schedule")

local steps = 200
for i, a in ipairs(wick.args) do
  if a == "--steps" then steps = tonumber(wick.args[i + 1]) or error("--steps needs a number") end
end

local model = wick.model{ dim = 128, n_layers = 4, n_heads = 4, seq_len = 128 }
local session = wick.session{ model = model, optim = wick.optim.adamw{ lr = 3e-3, clip = 1.0 } }

-- Phase 1 reads only short documents; phase 2 everything. The filter captures nothing but
-- globals, so it can travel to the data thread.
local short = wick.data.loader{
  name = "short",
  source = wick.data.jsonl{ "data/sample/train", shuffle = true,
                            filter = function(doc) return #doc.text < 3000 end },
  batch = 16, seq_len = 128,
}
local full = wick.data.loader{
  name = "full", source = wick.data.jsonl{ "data/sample/train", shuffle = true },
  batch = 16, seq_len = 128,
}

-- The copy task: "word|word" lines from a tiny seeded generator whose state is plain data.
local gen = { n = 0, x = wick.seed % 2147483647 + 1 }
local function rand(k)
  gen.x = gen.x * 48271 % 2147483647
  return gen.x % k
end
local copy = wick.data.loader{
  name = "copy",
  source = wick.data.lua{
    name = "copy-task",
    next = function()
      gen.n = gen.n + 1
      local w = {}
      for i = 1, 4 + rand(8) do w[i] = string.char(97 + rand(26)) end
      w = table.concat(w)
      return w .. "|" .. w .. "\n"
    end,
    state = function() return { n = gen.n, x = gen.x } end,
    restore = function(s) gen.n, gen.x = s.n, s.x end,
  },
  batch = 16, seq_len = 128,
}
local val = wick.data.loader{ name = "val", source = wick.data.jsonl{ "data/sample/validation" },
                              batch = 16, seq_len = 128 }
local lr = schedule.cosine{ lr = 3e-3, warmup = 20, steps = steps, min_lr = 3e-4 }

for step in session:steps(steps) do
  session.lr = lr(step)
  local batch
  if step % 4 == 0 then batch = copy:next()                 -- one step in four: the copy task
  elseif step <= steps * 0.4 then batch = short:next()      -- the curriculum's first phase
  else batch = full:next() end
  session:step(batch)
  if step % 50 == 0 or step == steps then
    wick.log{ val_loss = session:eval(val, 4), copy_loss = session:eval(copy, 2),
              short_docs_dropped = short.filtered }
  end
end
print(model:generate("abcdef|", { max_tokens = 12, temperature = 0 }))

-- The seed job: train on a SlimPajama directory with the data schedule in this recipe.
--   wick run scripts/slimpajama.lua -- --data DIR [--test] [--preset tiny|small|260k|15m]
--        [--steps N] [--batch B] [--seq-len S] [--lr LR] [--mix Book=3,Github=1]
--        [--eval-every N] [--chunks 1,2] [--tokenizer tokenizer.json] [--drop-github]
-- The host writes checkpoints/full_model.ckpt however the run ends: no periodic saves here.
local schedule = require("wick.schedule")

local opt = { data = "data/sample", preset = "tiny", steps = 600, batch = 16, seq_len = 128,
              lr = 2e-3, eval_every = 100, mix = "Book=3,Github=1" }
local flags = { test = false, ["drop-github"] = false }
local given = {}
local i = 1
while i <= #wick.args do
  local a = wick.args[i]
  local key = a:match("^%-%-(.+)$")
  if not key then error("unexpected argument '" .. a .. "'; options look like --steps 100") end
  if flags[key] ~= nil then
    flags[key] = true
    i = i + 1
  else
    local v = wick.args[i + 1] or error("option --" .. key .. " needs a value")
    local k = key:gsub("%-", "_")
    if opt[k] == nil and k ~= "chunks" and k ~= "tokenizer" then error("unknown option --" .. key) end
    opt[k] = tonumber(v) or v
    given[k] = true
    i = i + 2
  end
end
if flags.test then -- quick mode: tiny model, a few dozen steps, seconds
  local quick = { steps = 40, batch = 4, seq_len = 64, eval_every = 20 }
  for k, v in pairs(quick) do
    if not given[k] then opt[k] = v end
  end
end

local mix = {}
for name, w in tostring(opt.mix):gmatch("([%w_]+)=([%d%.]+)") do mix[name] = tonumber(w) end
if flags["drop-github"] then mix.Github = 0 end -- TinyLlama's choice
local chunks = nil
if opt.chunks then
  chunks = {}
  for n in tostring(opt.chunks):gmatch("%d+") do chunks[#chunks + 1] = tonumber(n) end
end

local tok = opt.tokenizer and wick.tokenizer.load(opt.tokenizer) or wick.tokenizer.bytes()
local model = wick.model{ preset = opt.preset, seq_len = opt.seq_len, tokenizer = tok }
local session = wick.session{ model = model, optim = wick.optim.adamw{ lr = opt.lr, weight_decay = 0.1, clip = 1.0 } }
local train = wick.data.loader{
  source = wick.data.slimpajama{ root = opt.data, split = "train", chunks = chunks, mix = mix, shuffle = true },
  batch = opt.batch, seq_len = opt.seq_len, tokenizer = tok, name = "train",
}
local val = wick.data.loader{
  source = wick.data.slimpajama{ root = opt.data, split = "validation" },
  batch = opt.batch, seq_len = opt.seq_len, tokenizer = tok, name = "validation",
}

-- Two phases: the first 80 % at the given mixture with warmup + cosine, then a short
-- cool-down phase that doubles the weight of books (a data schedule is just Lua).
local cool = {}
for k, v in pairs(mix) do cool[k] = (k == "Book") and v * 2 or v end
local lr = schedule.cosine{ lr = opt.lr, warmup = math.max(1, opt.steps // 20), steps = opt.steps }
local n1 = math.floor(opt.steps * 0.8)
local phases = schedule.phases{
  { name = "main", steps = n1, lr = lr, mix = mix },
  { name = "cool-down", steps = opt.steps - n1, lr = lr, mix = cool },
}

print(("slimpajama: %s, %d params, %d steps of %dx%d tokens"):format(opt.data, model.params, opt.steps, opt.batch, opt.seq_len))
for step in session:steps(opt.steps) do
  phases:apply(step, session, train)
  local loss = session:step(train:next())
  if step % opt.eval_every == 0 or step == opt.steps then
    wick.log{ train_loss = loss, val_loss = session:eval(val, 4), phase = phases:at(step).name }
  end
end
print(model:generate("ROMEO:", { max_tokens = 120, temperature = 0.8, top_k = 40 }))

-- The default job: a small byte-level llama trained on the shipped sample corpus.
-- wick run scripts/tiny.lua [-- --steps N]
local schedule = require("wick.schedule")

local steps = 250
for i, a in ipairs(wick.args) do
  if a == "--steps" then steps = tonumber(wick.args[i + 1]) or error("--steps needs a number") end
end

local model = wick.model{ dim = 128, n_layers = 4, n_heads = 4, seq_len = 128 }
local session = wick.session{
  model = model,
  optim = wick.optim.adamw{ lr = 3e-3, weight_decay = 0.1, clip = 1.0 },
}
local train = wick.data.loader{ source = wick.data.jsonl{ "data/sample/train", shuffle = true }, batch = 16, seq_len = 128 }
local val = wick.data.loader{ source = wick.data.jsonl{ "data/sample/validation" }, batch = 16, seq_len = 128 }
local lr = schedule.cosine{ lr = 3e-3, warmup = 20, steps = steps, min_lr = 3e-4 }

print(("model: %d parameters; training %d steps"):format(model.params, steps))
if session.global_step == 0 then wick.log{ val_loss = session:eval(val, 4) } end
for step in session:steps(steps) do
  session.lr = lr(step)
  session:step(train:next())
  if step % 100 == 0 or step == steps then
    wick.log{ val_loss = session:eval(val, 4) }
  end
end
print(model:generate("ROMEO:", { max_tokens = 200, temperature = 0.8, top_k = 40 }))
-- no save call: the host writes checkpoints/full_model.ckpt however this script ends

-- The recipe scripts/gpu-check.sh runs on the CPU and on a GPU from the same seed:
-- the tiny preset on the shipped sample, every step's loss logged to metrics.jsonl.
-- wick run scripts/gpu-check.lua --device cuda [--dtype bf16] -- [STEPS] [LR]
local steps = tonumber(wick.args[1]) or 20
local lr = tonumber(wick.args[2]) or 1e-3

local model = wick.model{ preset = "tiny" }
local session = wick.session{
  model = model,
  optim = wick.optim.adamw{ lr = lr, weight_decay = 0.1, clip = 1.0 },
}
local train = wick.data.loader{ source = wick.data.jsonl{ "data/sample/train" }, batch = 8, seq_len = 256 }

print(("gpu-check: %d parameters on %s in %s, %d steps"):format(model.params, wick.device, wick.dtype, steps))
for step in session:steps(steps) do
  local loss = session:step(train:next())
  wick.log{ step_loss = loss }
end

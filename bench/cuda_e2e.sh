#!/bin/bash
# The three scripts as users type them, on CUDA, on the tiny models: the flag families only a GPU exercises
# (bf16/fp16 mixed precision, AdamW8bit, --fp8_base, fused Adafactor, DoRA, torch.compile, --xformers refusal).
# Usage, on a GPU machine from the repo root: bash bench/cuda_e2e.sh OUTDIR  (runs on a CPU too,
# minutes slower; there --xformers is refused for having no CUDA)
set -u
OUTDIR=${1:?outdir}; W=/tmp/e2e; rm -rf $W; mkdir -p $W $OUTDIR
PY=${PY:-python3}
$PY - <<'PYEOF'
from library.models.tiny_models import make_tiny_model
make_tiny_model("sdxl", "/tmp/e2e/tiny_sdxl"); make_tiny_model("sd1", "/tmp/e2e/tiny_sd15")
PYEOF
$PY tools/make_sample_dataset.py --output $W/data --count 16 --size 128 >/dev/null
$PY tools/canny.py $W/data/images $W/data/canny >/dev/null
echo "a red circle on a white background --n blurry --s 8 --w 64 --h 64 --d 1" > $W/prompts.txt
XF="--sdpa"  # xformers has no build for the device torch (2.11): lora_xformers_refused checks the one-line refusal
COMMON="--train_data_dir $W/data/images --resolution 128 --train_batch_size 2 --seed 0 --max_data_loader_n_workers 2 --max_train_steps 6 --mixed_precision bf16"
NET="--in_json $W/data/meta.json --network_module networks.lora --network_dim 8 --network_alpha 8 --learning_rate 1e-3"
run() { name=$1; shift; ( start=$(date +%s); timeout ${T:-200} "$@" >$W/$name.log 2>&1; rc=$?; echo "$name $rc $(( $(date +%s) - start ))" >> $W/results.txt ) & }
run lora_xformers_refused $PY train_network.py --pretrained_model_name_or_path $W/tiny_sdxl $COMMON $NET --xformers --output_dir $W/out/lora_xformers_refused/nested --output_name lora
run lora_sdpa_8bit_sample $PY train_network.py --pretrained_model_name_or_path $W/tiny_sdxl $COMMON $NET $XF --optimizer_type AdamW8bit --cache_latents --sample_prompts $W/prompts.txt --sample_every_n_steps 3 --output_dir $W/out/lora_sdpa_8bit_sample/nested --output_name lora
run lora_fp8_base $PY train_network.py --pretrained_model_name_or_path $W/tiny_sdxl $COMMON $NET --fp8_base --network_train_unet_only --cache_text_encoder_outputs --cache_latents --output_dir $W/out/lora_fp8_base/nested --output_name lora
run dora_sd15_fp16 $PY train_network.py --pretrained_model_name_or_path $W/tiny_sd15 ${COMMON/bf16/fp16} $NET --network_args dora_wd=True --output_dir $W/out/dora_sd15_fp16/nested --output_name lora
run sdxl_fused_adafactor_bf16 $PY train_sdxl.py --pretrained_model_name_or_path $W/tiny_sdxl $COMMON --in_json $W/data/meta.json --full_bf16 --optimizer_type Adafactor --optimizer_args scale_parameter=False relative_step=False warmup_init=False --fused_backward_pass --learning_rate 1e-5 --gradient_checkpointing $XF --output_dir $W/out/sdxl_fused_adafactor_bf16/nested --output_name model --save_model_as safetensors
run controlnet_sdpa $PY train_controlnet.py --pretrained_model_name_or_path $W/tiny_sdxl $COMMON --conditioning_data_dir $W/data/canny --caption_extension .caption $XF --output_dir $W/out/controlnet_sdpa/nested --output_name cn
run lora_accelerate_launch_compile $PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no train_network.py --pretrained_model_name_or_path $W/tiny_sdxl $COMMON $NET --torch_compile --output_dir $W/out/lora_accelerate_launch_compile/nested --output_name lora
wait
$PY - "$OUTDIR" <<'PYEOF'
import json, sys, math
from pathlib import Path
from safetensors.torch import load_file
W = Path("/tmp/e2e"); out = {}
for line in (W / "results.txt").read_text().split("\n"):
    if not line.strip():
        continue
    name, rc, secs = line.split()
    files = sorted((W / "out" / name / "nested").glob("*.safetensors"))
    info = {"rc": int(rc), "wall_s": round(float(secs), 1), "files": [f.name for f in files]}
    bad = []
    for f in files:
        sd = load_file(f)
        bad += [k for k, v in sd.items() if v.is_floating_point() and not bool(v.float().isfinite().all())]
        info.setdefault("tensors", {})[f.name] = len(sd)
    samples = sorted((W / "out" / name / "nested").rglob("*.png"))
    info["samples"] = len(samples); info["nonfinite_tensors"] = bad[:5]
    log = (W / f"{name}.log").read_text(errors="replace").splitlines()
    info["error_lines"] = [l for l in log if l.startswith("error:")]
    info["log_tail"] = log[-6:] if int(rc) else [l for l in log if "error" in l.lower() or "xformers" in l.lower() or "fp8" in l.lower() or "8bit" in l.lower()][:6]
    out[name] = info
Path(sys.argv[1], "e2e.json").write_text(json.dumps(out, indent=1))
for name, info in out.items():
    ok = info["rc"] == 0 and info["files"] and not info["nonfinite_tensors"]
    if name.endswith("_refused"):
        ok = info["rc"] != 0 and not info["files"] and len(info["error_lines"]) == 1
        print("   ", info["error_lines"])
    print(f"E2E {'OK ' if ok else 'BAD'} {name}: rc {info['rc']} {info['wall_s']} s files {info['files']} samples {info['samples']}")
    if not ok:
        print("   ", "\n    ".join(info["log_tail"]))
PYEOF

"""Generate the shipped demo data sets (deterministic: same seed, same files).

adgen_demo: AdvertiseGen-format records. The attributes ("类型#上衣*材质#牛仔布*...") decide the
copy: every attribute value maps to its own phrases, so a model must read the attributes to write
the right text, and a small model can learn the mapping.

    python scripts/make_demo_data.py            # writes data/adgen_demo/{train,dev}.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TYPES = {
    "上衣": ["这款上衣", "这件上衣"],
    "连衣裙": ["这款连衣裙", "这条连衣裙"],
    "裤子": ["这款裤子", "这条裤子"],
    "外套": ["这款外套", "这件外套"],
    "半身裙": ["这款半身裙", "这条半身裙"],
}
MATERIALS = {
    "牛仔布": "采用牛仔布面料，耐磨又有型",
    "棉": "选用柔软的纯棉面料，亲肤透气",
    "雪纺": "选用轻盈的雪纺面料，飘逸灵动",
    "针织": "采用细腻的针织工艺，温暖舒适",
    "真丝": "采用顺滑的真丝面料，光泽高级",
    "蕾丝": "加入精致的蕾丝元素，浪漫迷人",
}
COLORS = {
    "白色": "白色的配色干净清爽",
    "黑色": "经典的黑色显瘦百搭",
    "红色": "热情的红色衬托好气色",
    "蓝色": "清新的蓝色宛如天空",
    "粉色": "甜美的粉色充满少女感",
    "绿色": "自然的绿色带来生机",
}
STYLES = {
    "简约": "整体风格简约大方",
    "复古": "透着浓浓的复古韵味",
    "街头": "彰显酷帅的街头气息",
    "通勤": "适合日常通勤穿着",
    "甜美": "洋溢着甜美的气质",
    "性感": "展现性感迷人的魅力",
}
PATTERNS = {
    "条纹": "经典的条纹图案修饰身形",
    "印花": "别致的印花图案个性十足",
    "格子": "时尚的格子图案充满学院风",
    "纯色": "纯色的设计低调耐看",
    "刺绣": "精美的刺绣点缀细节",
}
DETAILS = {
    "衣领型": {"圆领": "圆领设计修饰脸型", "v领": "v领设计拉长颈部线条", "翻领": "翻领设计干练利落"},
    "袖型": {"泡泡袖": "泡泡袖设计俏皮可爱", "喇叭袖": "喇叭袖设计灵动优雅", "无袖": "无袖设计清凉自在"},
    "裙长": {"短裙": "短款裙长显得双腿修长", "中长裙": "中长裙长优雅知性", "长裙": "长款裙摆温柔浪漫"},
    "裤型": {"阔腿裤": "阔腿裤型遮肉显瘦", "直筒裤": "直筒裤型利落有型", "哈伦裤": "哈伦裤型宽松舒适"},
}
DETAIL_KEYS_BY_TYPE = {
    "上衣": ["衣领型", "袖型"],
    "外套": ["衣领型", "袖型"],
    "连衣裙": ["裙长", "衣领型", "袖型"],
    "半身裙": ["裙长"],
    "裤子": ["裤型"],
}
ENDINGS = ["，让你轻松穿出好气质。", "，是衣橱里不可缺少的单品。", "，穿上它自信满满。"]


def make_record(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(list(TYPES))
    material = rng.choice(list(MATERIALS))
    color = rng.choice(list(COLORS))
    style = rng.choice(list(STYLES))
    pattern = rng.choice(list(PATTERNS))
    detail_key = rng.choice(DETAIL_KEYS_BY_TYPE[kind])
    detail_value = rng.choice(list(DETAILS[detail_key]))
    attrs = [("类型", kind), ("材质", material), ("颜色", color), ("风格", style), ("图案", pattern),
             (detail_key, detail_value)]
    # the source lists attributes in a shuffled order, as AdvertiseGen does
    head, rest = attrs[0], attrs[1:]
    rng.shuffle(rest)
    content = "*".join(f"{k}#{v}" for k, v in [head] + rest)
    summary = (
        f"{rng.choice(TYPES[kind])}{MATERIALS[material]}，{COLORS[color]}。"
        f"{PATTERNS[pattern]}，{DETAILS[detail_key][detail_value]}，{STYLES[style]}{rng.choice(ENDINGS)}"
    )
    return {"content": content, "summary": summary}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--dev", type=int, default=200)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < args.train + args.dev:
        record = make_record(rng)
        if record["content"] not in seen:  # dev never repeats a training source
            seen.add(record["content"])
            records.append(record)
    write_jsonl(args.out / "adgen_demo" / "train.json", records[: args.train])
    write_jsonl(args.out / "adgen_demo" / "dev.json", records[args.train :])
    print(f"wrote {args.train} train / {args.dev} dev records to {args.out / 'adgen_demo'}")


if __name__ == "__main__":
    main()

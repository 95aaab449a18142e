"""Generate the shipped demo data sets (deterministic: same seed, same files).

adgen_demo: AdvertiseGen-format records. The attributes ("类型#上衣*材质#牛仔布*...") decide the
copy: every attribute value maps to its own phrases, so a model must read the attributes to write
the right text, and a small model can learn the mapping.

conversations_demo: ChatGLM3-format multi-turn conversations in the same clothing domain
({"conversations": [...], "tools": [...]}, JSON lines): copywriting and fabric/colour questions
answered from the same phrase tables, and shop-assistant chats that call a stock or price tool
(a `tool` message with name, parameters and observation) and answer from the observation.
Some have a system prompt, some a tools list, a few a `"loss": false` earlier reply.

spo_demo: triple extraction in instruction/input/output format (a JSON array, one record a line):
template sentences about invented people, companies and places; the output lists the triples
`head_relation_tail`, one a line, for the relations 出生地, 毕业院校, 创始人, 总部, 成立时间.

history_demo: long ChatGLM3-format conversations (JSON lines) whose last answer depends on the FIRST
turn only: the customer first names a garment (类型/颜色/材质), then asks 10-17 unrelated questions
(sizes, delivery, washing, returns, styles, patterns: no colour or material word in them), then asks
"刚才那件衣服是什么颜色、什么面料？". The reply copies the first turn ("那件是红色的牛仔布外套。").
Each conversation is 600-950 tiny-model tokens before the last reply: max_source_length=512 cuts the
first turn away (the template keeps the end of the source), 1024 keeps everything
(conf/experiment/source_length_ablation.yaml). Earlier replies are context only (`"loss": false`)
except the first one, which repeats the facts at short range.

    python scripts/make_demo_data.py            # writes data/{adgen_demo,conversations_demo,spo_demo,history_demo}/{train,dev}.json
    python scripts/make_demo_data.py --only spo_demo --out /tmp/data
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


def write_json_array(path: Path, records: list[dict]) -> None:
    """A JSON array with one record per line (so a record's line number is easy to find)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")


def unique_records(make, rng: random.Random, n: int, key) -> list[dict]:
    """``n`` records from ``make(rng)`` with distinct ``key(record)`` (dev never repeats train)."""
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n:
        record = make(rng)
        k = key(record)
        if k not in seen:
            seen.add(k)
            records.append(record)
    return records


# ------------------------------------------------------------------------------ adgen_demo
def make_adgen(out: Path, seed: int, train: int, dev: int) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < train + dev:
        record = make_record(rng)
        if record["content"] not in seen:  # dev never repeats a training source
            seen.add(record["content"])
            records.append(record)
    write_jsonl(out / "adgen_demo" / "train.json", records[:train])
    write_jsonl(out / "adgen_demo" / "dev.json", records[train:])


# ---------------------------------------------------------------------- conversations_demo
SIZES = ["S", "M", "L", "XL"]
PRICES = [79, 99, 129, 159, 199, 259, 299, 399]
COPY_SYSTEM = "你是一名服装文案助手，根据商品属性撰写广告文案。"
SHOP_SYSTEM = "你是服装店的客服助手，可以查询库存和价格。"
# ChatGLM3 leaves the tool description format open; short ones keep the system prompt short
TOOLS = [
    {"name": "query_stock", "description": "查询商品库存", "parameters": {"type": "商品类型", "color": "颜色", "size": "尺码"}},
    {"name": "query_price", "description": "查询商品价格", "parameters": {"type": "商品类型"}},
]


def _copy_turns(rng: random.Random) -> list[dict]:
    kind = rng.choice(list(TYPES))
    material, color, style = rng.choice(list(MATERIALS)), rng.choice(list(COLORS)), rng.choice(list(STYLES))
    turns = [
        {"role": "user", "content": f"请根据商品属性写一段文案：类型#{kind}*材质#{material}*颜色#{color}*风格#{style}"},
        {"role": "assistant", "content": f"{TYPES[kind][0]}{MATERIALS[material]}，{COLORS[color]}，{STYLES[style]}。"},
    ]
    if rng.random() < 0.5:
        pattern = rng.choice(list(PATTERNS))
        turns += [
            {"role": "user", "content": f"再补充一句{pattern}图案的描述。"},
            {"role": "assistant", "content": f"{PATTERNS[pattern]}，让这款{kind}更有看点。"},
        ]
    return turns


def _question_turns(rng: random.Random) -> list[dict]:
    material, color, style = rng.choice(list(MATERIALS)), rng.choice(list(COLORS)), rng.choice(list(STYLES))
    questions = [
        (f"{material}面料的衣服有什么特点？", f"{material}面料的衣服{MATERIALS[material]}。"),
        (f"{color}的衣服好搭配吗？", f"{COLORS[color]}，很好搭配。"),
        (f"{style}风格的衣服是什么样的？", f"{style}风格的衣服{STYLES[style]}。"),
    ]
    rng.shuffle(questions)
    turns = []
    for question, answer in questions[: rng.randint(1, 3)]:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def _tool_turns(rng: random.Random) -> list[dict]:
    kind, color, size = rng.choice(list(TYPES)), rng.choice(list(COLORS)), rng.choice(SIZES)
    if rng.random() < 0.6:
        stock = 0 if rng.random() < 0.2 else rng.randint(1, 30)
        reply = (f"{color}{kind}{size}码还有{stock}件库存，欢迎下单。" if stock
                 else f"抱歉，{color}{kind}{size}码暂时缺货。")
        turns = [{"role": "user", "content": f"{color}的{kind}还有{size}码吗？"}]
        if rng.random() < 0.5:
            turns.append({"role": "assistant", "content": "我来帮您查询库存。"})
        turns += [
            {"role": "tool", "name": "query_stock", "parameters": {"type": kind, "color": color, "size": size},
             "observation": {"stock": stock}},
            {"role": "assistant", "content": reply},
        ]
    else:
        price = rng.choice(PRICES)
        turns = [{"role": "user", "content": f"这款{kind}多少钱？"}]
        if rng.random() < 0.5:
            turns.append({"role": "assistant", "content": "我来帮您查询价格。"})
        turns += [
            {"role": "tool", "name": "query_price", "parameters": {"type": kind}, "observation": {"price": price}},
            {"role": "assistant", "content": f"这款{kind}的售价是{price}元。"},
        ]
    return turns


def make_conversation(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.35:
        turns = _copy_turns(rng)
        system = COPY_SYSTEM
    elif kind < 0.7:
        turns = _question_turns(rng)
        system = None
    else:
        turns = _tool_turns(rng)
        if rng.random() < 0.3:  # a copywriting or question turn first, then the tool call
            turns = rng.choice([_copy_turns, _question_turns])(rng)[:2] + turns
        system = SHOP_SYSTEM
    if len([t for t in turns if t["role"] == "assistant"]) > 1 and rng.random() < 0.1:
        first = next(t for t in turns if t["role"] == "assistant")
        first["loss"] = False  # context only: no loss on the earlier reply
    conversations = ([{"role": "system", "content": system}] if system and rng.random() < 0.5 else []) + turns
    record: dict = {"conversations": conversations}
    if any(t["role"] == "tool" for t in turns):
        record = {"tools": TOOLS, "conversations": conversations}
    return record


def make_conversations(out: Path, seed: int, train: int, dev: int) -> None:
    rng = random.Random(f"{seed}:conversations_demo")
    records = unique_records(make_conversation, rng, train + dev, lambda r: json.dumps(r, ensure_ascii=False))
    write_jsonl(out / "conversations_demo" / "train.json", records[:train])
    write_jsonl(out / "conversations_demo" / "dev.json", records[train:])


# ------------------------------------------------------------------------------- spo_demo
SURNAMES = list("王李张刘陈杨黄赵周吴徐孙马朱胡郭何林高罗")
GIVEN_NAMES = ["伟", "芳", "敏", "静", "磊", "军", "洋", "勇", "杰", "涛", "明", "超", "华", "建国", "志强",
               "晓东", "雨桐", "子涵", "浩然", "思远", "嘉怡", "文博", "欣怡", "宇航", "婷婷", "俊杰"]
CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "南京", "西安", "重庆", "天津", "苏州",
          "长沙", "青岛", "厦门", "昆明", "大连", "合肥", "郑州", "济南"]
UNIVERSITIES = ["清华大学", "北京大学", "浙江大学", "复旦大学", "上海交通大学", "南京大学", "武汉大学",
                "中山大学", "四川大学", "厦门大学", "同济大学", "南开大学"]
COMPANY_HEADS = ["星辰", "蓝海", "华锐", "云帆", "金石", "远航", "天启", "博远", "鼎泰", "恒信", "瑞丰",
                 "明川", "青禾", "嘉木", "致远", "卓越"]
COMPANY_TAILS = ["科技", "网络", "食品", "汽车", "医药", "能源", "传媒", "教育"]
SPO_INSTRUCTION = "抽取文本中关系为出生地、毕业院校、创始人、总部、成立时间的三元组，格式为头实体_关系_尾实体，每行一个。文本："
# (sentence template, triples); p/q people, c company, city, u university, y year
SPO_TEMPLATES = [
    ("{p}出生于{city}，毕业于{u}。", [("p", "出生地", "city"), ("p", "毕业院校", "u")]),
    ("{c}由{p}创立，总部位于{city}。", [("c", "创始人", "p"), ("c", "总部", "city")]),
    ("{c}成立于{y}，创始人是{p}。", [("c", "成立时间", "y"), ("c", "创始人", "p")]),
    ("{p}是{city}人，{y}创办了{c}。", [("p", "出生地", "city"), ("c", "创始人", "p"), ("c", "成立时间", "y")]),
    ("{c}的总部设在{city}。", [("c", "总部", "city")]),
    ("{p}毕业于{u}，后来与{q}共同创立了{c}。", [("p", "毕业院校", "u"), ("c", "创始人", "p"), ("c", "创始人", "q")]),
    ("出生在{city}的{p}是{c}的创始人。", [("p", "出生地", "city"), ("c", "创始人", "p")]),
    ("{c}是一家总部位于{city}的公司，由{u}毕业的{p}于{y}创立。",
     [("c", "总部", "city"), ("p", "毕业院校", "u"), ("c", "创始人", "p"), ("c", "成立时间", "y")]),
    ("{p}生于{city}。", [("p", "出生地", "city")]),
    ("{y}，{p}在{city}创办了{c}，并把总部设在那里。", [("c", "成立时间", "y"), ("c", "创始人", "p"), ("c", "总部", "city")]),
]


def make_spo(rng: random.Random) -> dict:
    template, triples = rng.choice(SPO_TEMPLATES)
    p = rng.choice(SURNAMES) + rng.choice(GIVEN_NAMES)
    q = p
    while q == p:
        q = rng.choice(SURNAMES) + rng.choice(GIVEN_NAMES)
    slots = {
        "p": p,
        "q": q,
        "c": rng.choice(COMPANY_HEADS) + rng.choice(COMPANY_TAILS) + rng.choice(["公司", "集团"]),
        "city": rng.choice(CITIES),
        "u": rng.choice(UNIVERSITIES),
        "y": f"{rng.randint(1985, 2022)}年",
    }
    return {
        "instruction": SPO_INSTRUCTION,
        "input": template.format(**slots),
        "output": "\n".join(f"{slots[h]}_{relation}_{slots[t]}" for h, relation, t in triples),
    }


def make_spo_set(out: Path, seed: int, train: int, dev: int) -> None:
    rng = random.Random(f"{seed}:spo_demo")
    records = unique_records(make_spo, rng, train + dev, lambda r: r["input"])
    write_json_array(out / "spo_demo" / "train.json", records[:train])
    write_json_array(out / "spo_demo" / "dev.json", records[train:])


# ----------------------------------------------------------------------------- history_demo
CITIES_SHIP = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "南京", "西安", "重庆"]
HISTORY_FIRST = [
    "我刚看中一件衣服，你先帮我记一下：类型#{kind}*颜色#{color}*材质#{material}",
    "帮我记住这件商品：类型#{kind}*颜色#{color}*材质#{material}，待会儿我再问你。",
    "先记一下我想买的这件：类型#{kind}*颜色#{color}*材质#{material}",
]
HISTORY_FINAL = ["刚才那件衣服是什么颜色、什么面料？", "我最开始让你记的那件是什么颜色、什么面料的？",
                 "对了，刚才那件衣服是什么颜色和面料来着？"]


def _filler_turn(rng: random.Random) -> tuple[str, str]:
    """One unrelated question and its (long) answer: no colour or material word in either."""
    topic = rng.randrange(7)
    style, pattern = rng.choice(list(STYLES)), rng.choice(list(PATTERNS))
    key = rng.choice(list(DETAILS))
    detail = rng.choice(list(DETAILS[key]))
    ending = rng.choice(ENDINGS)
    if topic == 0:
        h, w, size = rng.randint(150, 185), rng.randint(80, 160), rng.choice(SIZES)
        return (f"我身高{h}厘米，体重{w}斤，平时穿衣服喜欢宽松一点，应该选什么尺码比较合适？",
                f"根据您的身高{h}厘米和体重{w}斤，建议选择{size}码，如果喜欢宽松一点的效果可以再选大一码，"
                f"每件商品的详情页都有尺码表，下单前可以对照一下自己的肩宽和胸围。")
    if topic == 1:
        city, days = rng.choice(CITIES_SHIP), rng.randint(2, 5)
        return (f"发货到{city}一般要几天？能不能指定快递公司？",
                f"发往{city}的订单一般{days}天左右送达，下单后二十四小时内安排发货，"
                f"默认使用合作的快递公司，暂时不能指定，物流信息可以在订单页面随时查看。")
    if topic == 2:
        return ("这类衣服平时应该怎么洗护才不容易变形？",
                "建议翻面后放进洗衣袋轻柔机洗或者手洗，水温不要超过三十度，不要长时间浸泡，"
                "洗完后平铺晾干，避免暴晒和烘干，这样能保持版型，穿得更久。")
    if topic == 3:
        days = rng.choice([7, 15])
        return ("如果买回去穿着不合适，可以退换吗？运费谁出？",
                f"支持{days}天无理由退换，商品不影响二次销售就可以申请，"
                f"质量问题的运费由我们承担，其他情况可以使用运费险，退款会在收到退货后三天内处理。")
    if topic == 4:
        return (f"{style}风格的衣服一般适合什么场合穿？",
                f"{style}风格的衣服{STYLES[style]}，{PATTERNS[pattern]}，{DETAILS[key][detail]}{ending}")
    if topic == 5:
        return (f"{pattern}图案配{detail}的款式好看吗？",
                f"{PATTERNS[pattern]}，{DETAILS[key][detail]}，{STYLES[style]}{ending}")
    n = rng.randint(2, 9)
    return (f"你们店里现在有什么优惠活动吗？买{n}件能便宜多少？",
            f"现在店铺有满减活动，买{n}件可以享受额外的折扣，新用户还可以领取优惠券，"
            f"活动期间的订单同样支持退换，具体的优惠金额以结算页面显示为准。")


def make_history_conversation(rng: random.Random) -> dict:
    kind, color, material = rng.choice(list(TYPES)), rng.choice(list(COLORS)), rng.choice(list(MATERIALS))
    turns = [
        {"role": "user", "content": rng.choice(HISTORY_FIRST).format(kind=kind, color=color, material=material)},
        {"role": "assistant", "content": f"好的，已经记下：一件{color}的{material}{kind}。"},
    ]
    # unrelated turns until the conversation is ~950-1,350 characters (~620-900 tiny-model tokens)
    target, length = rng.randint(950, 1350), sum(len(t["content"]) for t in turns) + len(SHOP_SYSTEM)
    while length < target:
        question, answer = _filler_turn(rng)
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "loss": False}]
        length += len(question) + len(answer)
    turns += [{"role": "user", "content": rng.choice(HISTORY_FINAL)},
              {"role": "assistant", "content": f"那件是{color}的{material}{kind}。"}]
    return {"conversations": [{"role": "system", "content": SHOP_SYSTEM}] + turns}


def make_history_set(out: Path, seed: int, train: int, dev: int) -> None:
    rng = random.Random(f"{seed}:history_demo")
    records = unique_records(make_history_conversation, rng, train + dev, lambda r: json.dumps(r, ensure_ascii=False))
    write_jsonl(out / "history_demo" / "train.json", records[:train])
    write_jsonl(out / "history_demo" / "dev.json", records[train:])


# (generator, default train size, default dev size)
DATASETS = {
    "adgen_demo": (make_adgen, 3000, 200),
    "conversations_demo": (make_conversations, 1000, 100),
    "spo_demo": (make_spo_set, 1000, 100),
    "history_demo": (make_history_set, 100, 24),
}


def generate(out: Path, seed: int = 0, only: list[str] | None = None, sizes: dict | None = None) -> None:
    """Write the demo sets under ``out`` (the shipped files: seed 0, default sizes)."""
    for name in only or list(DATASETS):
        make, train, dev = DATASETS[name]
        train, dev = (sizes or {}).get(name, (train, dev))
        make(out, seed, train, dev)
        print(f"wrote {train} train / {dev} dev records to {out / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(DATASETS), help="generate only these sets")
    parser.add_argument("--train", type=int, default=None, help="adgen_demo train size (default 3000)")
    parser.add_argument("--dev", type=int, default=None, help="adgen_demo dev size (default 200)")
    args = parser.parse_args()
    sizes = {}
    if args.train is not None or args.dev is not None:
        _, train, dev = DATASETS["adgen_demo"]
        sizes["adgen_demo"] = (args.train if args.train is not None else train, args.dev if args.dev is not None else dev)
    generate(args.out, args.seed, args.only, sizes)


if __name__ == "__main__":
    main()

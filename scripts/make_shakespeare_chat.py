"""Write the bundled "who speaks this line?" chat set as JSONL, for `lmscale finetune lora`.

python scripts/make_shakespeare_chat.py --out speakers.jsonl [--play tragedies/hamlet]
"""

import argparse

from lmscale.finetune.shakespeare_chat import DEFAULT_PLAY, speaker_conversations, write_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--play", default=DEFAULT_PLAY, help="<genre>/<play> of the corpus")
    parser.add_argument("--limit", type=int, default=200, help="questions in all")
    parser.add_argument("--turns", type=int, default=1, help="questions per conversation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    conversations = speaker_conversations(args.play, args.limit, args.turns, args.seed)
    print(write_jsonl(conversations, args.out), f"({len(conversations)} conversations)")


if __name__ == "__main__":
    main()

"""On-policy preference data, as SimPO's strongest models were trained on (princeton-nlp/SimPO
``on_policy_data_gen/``): the policy samples K answers per prompt, a reward model scores them, the best
becomes ``chosen`` and the worst ``rejected``.

    simpo-ds generate --model POLICY --prompts PROMPTS --out DIR --num_samples 5   # generate.py
    simpo-ds score --data DIR --reward_model RM                                   # score.py
    simpo-ds binarize --data DIR --out DIR/pairs                                  # binarize.py
    simpo-ds train recipe.yaml --train_data DIR/pairs/train.jsonl --eval_data DIR/pairs/test.jsonl

``generate`` and ``score`` shard over ranks (torchrun / deepspeed / srun start launch/generate.py and
launch/score.py) and resume (``jobs``). See docs/onpolicy.md.
"""

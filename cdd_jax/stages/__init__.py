"""The stages of a job, each wiring the rooms below it (data, models, objectives, the loop):

    pretrain.py   stage 1: the unconditional teacher
    teacher.py    where a distillation job's teacher comes from (shipped, given, or pretrained)
    distill.py    stage 2: the conditional network trained with `distill.objective`
    sr.py         the "sr" job: teacher -> distillation -> evaluation
    table1.py     the "table1" job: every row of the paper's Table 1 trained and evaluated
"""

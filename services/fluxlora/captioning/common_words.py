"""A built-in list of common English words, for judging a trigger word when no tokenizer is at hand.

A trigger that is an everyday word ("dog", "style", "red") already means something to the text
encoders: the LoRA then has to fight that meaning instead of filling an empty word. The real test
is the base model's own tokenizer (see text_encoders.trigger_warnings); this list is the offline
fallback: the most frequent English words plus the nouns captioners use for photo subjects.
"""

from __future__ import annotations

COMMON_WORDS = frozenset(
    """
    a about above after again against all also always am an and any are around as at away back
    be because been before being below between both but by can could did do does doing down
    during each else even ever every few for from further get go good got had has have having he
    her here hers herself him himself his how i if in into is it its itself just like made make
    many may me more most much must my myself never new no nor not now of off often old on once
    one only or other our ours out over own same see she should so some still such than that the
    their theirs them then there these they this those through to too two under until up upon us
    very was way we well were what when where which while who whom why will with would yes yet
    you your yours
    three four five six seven eight nine ten first second last next big small large little long
    short tall high low great best better right left top bottom front side middle center
    red orange yellow green blue purple pink brown black white gray grey gold silver dark light
    bright clear clean dirty hot cold warm cool wet dry soft hard sharp blurry round square flat
    young happy sad real true fake full empty open closed beautiful pretty cute ugly nice
    man men woman women person people boy girl child children kid kids baby guy lady face head
    hair eye eyes nose mouth lips hand hands arm arms leg legs body skin beard smile teeth
    dog dogs cat cats bird birds horse fish animal pet cow sheep bear lion tiger
    car cars bike bicycle truck bus train plane boat ship road street city town house home room
    wall floor door window table chair bed sofa couch desk kitchen garden park tree trees flower
    flowers grass leaf leaves plant sky sun moon star stars cloud clouds rain snow water sea ocean
    lake river beach sand mountain hill rock stone forest field desert island bridge tower
    building church castle sign shop store
    bottle cup glass mug plate bowl box bag book paper phone camera computer laptop screen watch
    clock lamp light toy ball doll shoe shoes hat cap shirt dress coat jacket suit tie scarf
    glasses ring necklace food fruit apple banana bread cake pizza coffee tea wine beer
    photo photograph picture image portrait painting drawing sketch art artwork style design
    pattern logo label text word name color colour shape line lines background foreground view
    shot scene close closeup render model figure object thing things
    day night morning evening sunset sunrise summer winter spring autumn fall time year
    standing sitting walking running lying looking holding wearing posing smiling playing
    style styled realistic photorealistic cinematic vintage retro modern classic digital analog
    film anime cartoon comic
    """.split()
)

# Triggers that look made up but that CLIP's vocabulary holds as one token with a meaning of its
# own: "sks" (the SKS rifle) is the classic DreamBooth example.
WELL_KNOWN_TOKENS = frozenset({"sks"})

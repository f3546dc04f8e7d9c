"""The plain English a reason may be written in, besides the words of its own evidence.

A reason is one short sentence in a narrow register: ``Because you watched "X" and "Y": another crime pick.``
:func:`rerank.reasons.check_reason` accepts a word outside the quoted titles only if it is one of these, or a
word of the prompt, the recommendation's title, the history's titles or the catalog's genres. The list holds
function words (articles, pronouns, prepositions, conjunctions, auxiliaries), the verbs and nouns of engaging with
items of any catalog (watched, listened, read, played; film, episode, song, book) and the adjectives a
recommendation uses. It holds no profanity, no names and no rare words: a model that strays into them (or a
random one, whose greedy text is a string of word pieces from a vocabulary of tens of thousands) writes words that
are not here, and its reason falls back to the template.
"""

from __future__ import annotations

_FUNCTION = """
a an the this that these those such another other others each every both either neither any some all no none
more most much many few several less least own same
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs one ones
who whom whose which what whatever whoever where when while why how whether
and or but nor so yet if then than because since as though although unless until whereas also too either
of in on at by for with without from to into onto over under about above below after before between among
through throughout during against along across around behind beyond near like unlike toward towards upon via
per plus within
be am is are was were been being do does did done doing have has had having will would shall should can could
may might must ought let lets let's
not never ever just only even still already again once twice here there now soon often always usually perhaps
maybe quite very really rather pretty fairly truly especially particularly mostly mainly simply almost nearly
well better best far further much more most enough indeed instead also likewise similarly equally
probably possibly likely definitely certainly surely absolutely clearly naturally exactly right together
alone away back up down out off on yes so-called
i'm you're you've you'll you'd it's that's there's he's she's they're they've we're we've isn't aren't
don't doesn't didn't won't wouldn't can't couldn't shouldn't
"""

_VERBS = """
watch watches watched watching rewatch rewatched see sees saw seen seeing view viewed viewing
listen listens listened listening hear heard read reads reading play plays played playing
like likes liked liking love loves loved loving enjoy enjoys enjoyed enjoying appreciate appreciated
prefer prefers preferred rate rated rating rated buy bought
find finds found finding want wants wanted wanting fancy fancied
give gives gave given make makes made making take takes took taken bring brings brought
keep keeps kept share shares shared sharing match matches matched matching suit suits suited
fit fits fitted feature features featured featuring follow follows followed following
offer offers offered combine combines combined blend blends blended mix mixes mixed
explore explores explored exploring tell tells told telling show shows showed shown showing
get gets got getting go goes went going come comes came coming look looks looked looking
feel feels felt seem seems seemed sound sounds sounded appeal appeals appealed
recommend recommends recommended suggest suggests suggested pick picks picked choose chose chosen
continue continues continued return returns returned revisit revisited discover discovered
relate relates related remind reminds reminded resemble resembles echo echoes echoed
"""

_NOUNS = """
film films movie movies picture pictures cinema show shows series season seasons episode episodes
title titles item items story stories tale tales plot plots book books novel novels song songs track tracks
album albums music podcast podcasts game games video videos clip clips programme program
genre genres kind kinds type types sort style styles tone tones mood moods feel vibe theme themes
taste tastes favourite favourites favorite favorites fan fans viewer viewers listener listeners reader readers
pick picks choice choices option options recommendation recommendations match mix blend
character characters cast actor actors actress performance performances director directors hero heroes
heroine villain villains journey adventure adventures action drama comedy humour humor romance mystery
suspense tension twist twists ending endings world worlds era period time times classic classics
history past future life lives family families friendship love war crime science fiction fantasy
horror thriller thrillers documentary documentaries animation musical musicals western westerns
sense spirit touch flavour flavor energy pace heart wit charm atmosphere setting settings
something anything everything nothing someone anyone everyone thing things way ways lot bit
year years day days night nights fun
"""

_ADJECTIVES = """
good great fine nice excellent wonderful brilliant superb fantastic amazing terrific solid strong
similar alike related comparable close same different new old recent modern classic timeless vintage
funny hilarious witty clever smart sharp light lighthearted light-hearted playful charming sweet warm
gentle tender moving touching heartfelt emotional poignant powerful intense gripping thrilling exciting
tense suspenseful dark gritty grim bleak serious thoughtful deep smart quirky offbeat odd strange weird
epic grand big large small little short long slow fast quick bold daring fresh original unique
beautiful stunning visual atmospheric stylish dramatic romantic comic comedic tragic scary creepy eerie
spooky mysterious magical fantastic futuristic animated musical historical political satirical
family-friendly feel-good must-see well-made well-known popular acclaimed beloved celebrated memorable
favourite favorite likely sure certain fitting natural obvious perfect ideal right next first second last
same-genre whole full entire real true human personal familiar
"""

COMMON_WORDS: frozenset[str] = frozenset(
    w for block in (_FUNCTION, _VERBS, _NOUNS, _ADJECTIVES) for w in block.split()
)
